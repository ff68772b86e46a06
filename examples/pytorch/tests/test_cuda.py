"""The op on CUDA (our CUDA backend's forward and backward, TttBackwardKernels<Cuda>) against the
CPU op on the same random layer and input: y, grad.x and every parameter gradient within 1e-5 of
their max |CPU value| (fp32). Exits 77 without a CUDA device. Builds the CUDA translation unit
(TTT_TORCH_CUDA=1; several minutes of nvcc the first time)."""
import os
import sys

from common import rel_err, require_torch, skip

torch = require_torch()
if not torch.cuda.is_available():
    skip("no CUDA device (or torch without CUDA)")
os.environ.setdefault("TTT_TORCH_CUDA", "1")
import ttt_torch  # noqa: E402

failures = 0
for kind, gate, L in (("linear", False, 64), ("linear", True, 37), ("mlp", False, 64), ("mlp", True, 29)):
    torch.manual_seed(L)
    m = ttt_torch.TTTLayer(128, 2, kind=kind, mini_batch_size=16, use_gate=gate)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.05 * torch.randn_like(p) if n != "learnable_token_idx" else 0.02 * torch.randn_like(p))
    x = torch.randn(2, L, 128)
    dy = torch.randn(2, L, 128)
    res = {}
    for dev in ("cpu", "cuda"):
        md = m.to(dev)
        md.zero_grad()
        xd = x.detach().clone().to(dev).requires_grad_(True)  # a leaf on each device
        y = md(xd)
        (y * dy.to(dev)).sum().backward()
        # Copies: on the CPU .cpu() aliases, and Module.to moves the gradients' storage in place.
        res[dev] = {"y": y.detach().cpu().clone(), "grad.x": xd.grad.cpu().clone(),
                    **{"grad." + n: p.grad.cpu().clone() for n, p in md.named_parameters()}}
    worst = max(rel_err(res["cuda"][k], res["cpu"][k]) for k in res["cpu"])
    ok = worst <= 1e-5
    failures += 0 if ok else 1
    print(f"cuda vs cpu {kind} gate={gate} L={L}: worst {worst:.2e} {'ok' if ok else 'FAIL'}")
sys.exit(1 if failures else 0)
