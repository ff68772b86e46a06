"""Shared by the extension's tests: skip (exit 77, with the reason) when a module is missing,
a dependency-free safetensors reader, the repository paths and the error measure."""
import json
import os
import pathlib
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
PYTORCH_DIR = HERE.parent                      # examples/pytorch
ROOT = PYTORCH_DIR.parent.parent               # the checkout
FIXTURES = ROOT / "tests" / "data" / "fixtures"
sys.path.insert(0, str(PYTORCH_DIR))


def skip(reason):
    print(f"SKIPPED: {reason}", flush=True)
    sys.exit(77)


def require_torch(min_version=None):
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        skip(f"torch is not importable ({e}); install python3-torch (Debian) or torch (PyPI)")
    if min_version is not None:
        have = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        if have < min_version:
            skip(f"torch {torch.__version__} is older than {'.'.join(map(str, min_version))}")
    return torch


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """torch.nn.functional.scaled_dot_product_attention as PyTorch documents it (its math
    backend): softmax(Q Kᵀ · scale + mask) V, a boolean mask keeping where True. For torch < 2.0,
    which lacks it; no dropout (the tests run in eval mode)."""
    import math
    import torch
    if dropout_p != 0.0:
        raise NotImplementedError("the test shim of scaled_dot_product_attention has no dropout")
    L, S = query.shape[-2], key.shape[-2]
    s = (1.0 / math.sqrt(query.shape[-1])) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def require_moshi():
    """torch, with Kyutai's moshi package importable, or a skip saying what is missing. moshi
    0.2.13 declares torch >= 2.2, but its LMModel (what these tests use: teacher-forced forward)
    runs on Debian 12's torch 1.13 given scaled_dot_product_attention, which torch gained in 2.0:
    there the test provides PyTorch's documented math for it and says so, and turns moshi's
    torch.compile off (NO_TORCH_COMPILE, moshi's own switch; compiling changes no result)."""
    torch = require_torch()
    import torch.nn.functional as F
    if not hasattr(F, "scaled_dot_product_attention"):
        F.scaled_dot_product_attention = _sdpa_math
        print(f"note: torch {torch.__version__} has no scaled_dot_product_attention: moshi runs on the "
              "test's math version of it (common._sdpa_math)", flush=True)
    if not hasattr(torch, "compile"):  # moshi wraps its norms in torch.compile unless told not to
        os.environ["NO_TORCH_COMPILE"] = "1"
    try:
        import moshi  # noqa: F401
        from moshi.models import lm  # noqa: F401
    except Exception as e:
        skip(f"moshi is not importable ({type(e).__name__}: {e}); pip install moshi==0.2.13, or with "
             "Debian's torch: tools/python_env.sh installs it without its dependencies")
    return torch


_DTYPES = {"F32": ("<f4", 4), "F64": ("<f8", 8), "I64": ("<i8", 8), "I32": ("<i4", 4), "U8": ("|u1", 1)}


def read_safetensors(path):
    """name -> torch tensor (CPU) of a safetensors file (F32/F64/I64/I32/U8)."""
    import numpy as np
    import torch
    data = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, size = _DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=dt).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def write_safetensors(path, tensors):
    """Writes name -> CPU tensor (float32 / int64) as safetensors."""
    import numpy as np
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        a = t.detach().cpu().contiguous().numpy()
        code = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("float64"): "F64"}[a.dtype]
        b = a.tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def rel_err(a, ref):
    """max |a - ref| / max |ref| (ref the reference), in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def threads():
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
