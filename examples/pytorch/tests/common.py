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
