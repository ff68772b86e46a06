"""TTTLinear / TTTMLP (our custom ops) against ttt-lm-pytorch's module: the forward fixtures
(tests/data/fixtures/ttt: y_full) and the gradient fixtures (tests/data/fixtures/ttt_grad:
y, grad.x and grad.<name> of every parameter, ttt-lm-pytorch autograd in float64). The
fixtures' weights load with load_state_dict(strict=True): the parameter names and shapes are
ttt-lm-pytorch's. Criterion: every tensor within 1e-5 of its max |reference| (float32)."""
import sys

from common import FIXTURES, load_json, read_safetensors, rel_err, require_torch, threads

torch = require_torch()
threads()
import ttt_torch  # noqa: E402

TOL = 1e-5


def make_module(cfg):
    cls = ttt_torch.TTTMLP if cfg["kind"] == "mlp" else ttt_torch.TTTLinear
    return cls(cfg["hidden_size"], cfg["num_heads"], mini_batch_size=cfg["mini_batch_size"],
               ttt_base_lr=cfg["ttt_base_lr"], use_gate=cfg["use_gate"], rope_theta=cfg["rope_theta"],
               ttt_norm_eps=cfg["ttt_norm_eps"], post_norm_eps=cfg["post_norm_eps"])


def load(case_dir):
    cfg = load_json(case_dir / "config.json")
    m = make_module(cfg)
    w = read_safetensors(case_dir / "weights.safetensors")
    m.load_state_dict(w, strict=True)  # the names and shapes are exactly the fixture's
    return m, read_safetensors(case_dir / "io.safetensors")


failures = 0
worst = 0.0


def check(case, name, got, ref):
    global failures, worst
    e = rel_err(got, ref)
    worst = max(worst, e)
    ok = tuple(got.shape) == tuple(ref.shape) and e <= TOL
    if not ok:
        failures += 1
    print(f"  {case:46s} {name:28s} rel {e:.2e} {'ok' if ok else 'FAIL'}")


for case_dir in sorted((FIXTURES / "ttt").iterdir()):
    m, io = load(case_dir)
    with torch.no_grad():
        y = m(io["x"])
    check(case_dir.name, "y_full", y, io["y_full"])

for case_dir, keep_tape in [(d, k) for d in sorted((FIXTURES / "ttt_grad").iterdir()) for k in (True, False)]:
    # keep_tape: the backward from the forward's tape; False: the backward re-runs the forward
    m, io = load(case_dir)
    m.keep_tape = keep_tape
    m.checkpoint_group = 1 if keep_tape else 2  # the recompute runs use checkpoint groups of 2
    x = io["x"].clone().requires_grad_(True)
    y = m(x)
    (y * io["dy"]).sum().backward()
    case = case_dir.name + ("" if keep_tape else " (recompute, g 2)")
    check(case, "y", y, io["y"])
    check(case, "grad.x", x.grad, io["grad.x"])
    names = [n for n, _ in m.named_parameters()]
    expected = sorted(k[len("grad."):] for k in io if k.startswith("grad.") and k != "grad.x")
    if sorted(names) != expected:
        print(f"  {case_dir.name}: parameters {sorted(names)} != fixture gradients {expected} FAIL")
        failures += 1
    for n, p in m.named_parameters():
        check(case, "grad." + n, p.grad, io["grad." + n])

print(f"ttt layer fixtures: worst {worst:.2e} (tolerance {TOL:.0e}), {failures} failures")
sys.exit(1 if failures else 0)
