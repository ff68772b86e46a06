"""Builds and loads the C++ extension (the `torch.ops.ttt` custom ops).

The extension is compiled on first use with torch.utils.cpp_extension.load (JIT, cached):
csrc/ttt_ops.cpp (CPU) and, when torch has CUDA and nvcc is found, csrc/ttt_ops_cuda.cu
(CUDA, over our CUDA backend). Environment:
  TTT_TORCH_BUILD_DIR   where the build is cached, per torch version (default ~/.cache/ttt/torch_ext)
  TTT_TORCH_CUDA        0: CPU only even when CUDA is available; 1: require CUDA
  TTT_INCLUDE           the ttt headers (default: this checkout's include/)
  TTT_TORCH_VERBOSE     1: print the compiler commands
"""
import os
import pathlib
import shutil

import torch

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent  # examples/pytorch
_loaded = False


def _include_dirs():
    inc = os.environ.get("TTT_INCLUDE") or str(_ROOT.parent.parent / "include")
    dirs = [inc, str(_ROOT / "csrc")]
    for eigen in ("/usr/include/eigen3", "/usr/local/include/eigen3"):
        if os.path.isdir(eigen):
            dirs.append(eigen)
            break
    return dirs


def cuda_wanted():
    flag = os.environ.get("TTT_TORCH_CUDA")
    if flag == "0":
        return False
    have = torch.cuda.is_available() and (shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc"))
    if flag == "1" and not have:
        raise RuntimeError("ttt_torch: TTT_TORCH_CUDA=1 but torch has no CUDA device or nvcc is missing")
    return have


def load():
    """Compiles (once, cached) and loads the extension; the ops are then torch.ops.ttt.*."""
    global _loaded
    if _loaded:
        return
    from torch.utils import cpp_extension

    use_cuda = cuda_wanted()
    sources = [str(_ROOT / "csrc" / "ttt_ops.cpp")]
    if use_cuda:
        sources.append(str(_ROOT / "csrc" / "ttt_ops_cuda.cu"))
    build = os.path.join(os.environ.get("TTT_TORCH_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ttt", "torch_ext"),
                         torch.__version__.replace("+", "_") + ("_cuda" if use_cuda else "_cpu"))
    os.makedirs(build, exist_ok=True)
    # C++20 (our headers); -O2 without -march=native so the cache stays valid across machines.
    cflags = ["-std=c++20", "-O2", "-fopenmp", "-DNDEBUG", "-Wno-unused-parameter"]
    nvcc_flags = ["-std=c++20", "-O2", "--expt-relaxed-constexpr", "--extended-lambda", "-DTTT_WITH_CUDA=1", "-Xcudafe=--diag_suppress=20012",
                  "-gencode=arch=compute_90,code=sm_90"]
    ldflags = ["-fopenmp"] + (["-lcublas", "-lcublasLt"] if use_cuda else [])
    if use_cuda:
        cflags.append("-DTTT_WITH_CUDA=1")
    cpp_extension.load(
        name="ttt_torch_ops" + ("_cuda" if use_cuda else ""),
        sources=sources,
        extra_include_paths=_include_dirs(),
        extra_cflags=cflags,
        extra_cuda_cflags=nvcc_flags,
        extra_ldflags=ldflags,
        build_directory=build,
        is_python_module=False,
        verbose=os.environ.get("TTT_TORCH_VERBOSE") == "1",
    )
    _loaded = True
