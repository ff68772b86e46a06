"""The four TTT-in-Moshi designs as PyTorch modules around moshi's LMModel (ttt_torch.moshi_designs):
  1. each design against its float64 fixture (tests/data/fixtures/ttt_moshi, an independent
     float64 implementation of the designs spec around moshi 0.2.13), the fixture's checkpoint
     loaded with load_state_dict(strict=True): unmasked logits and text logits within 1e-4 of
     their max |reference|;
  2. export: a model with all four designs (examples/configs/tiny_ttt.json) with perturbed TTT
     weights, saved under its state-dict names, run by `ttt-moshi forward` (the C++ engine) on the
     same codes: logits within 1e-4 (absolute) of PyTorch's;
  3. training: a loss on the logits reaches every TTT parameter of every design with a finite,
     non-zero gradient.
Usage: test_moshi_designs.py [--ttt-moshi PATH]  (without it, part 2 is skipped with a message)."""
import os
import subprocess
import sys
import tempfile

from common import FIXTURES, ROOT, load_json, read_safetensors, rel_err, require_moshi, skip, threads, write_safetensors

torch = require_moshi()
threads()
from ttt_torch.moshi_designs import build_lm, export_state_dict  # noqa: E402

TOL = 1e-4
failures = 0


def report(what, err, tol):
    global failures
    ok = err <= tol
    failures += 0 if ok else 1
    print(f"  {what:60s} {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)


def masked(t, mask):
    return t[mask.bool().unsqueeze(-1).expand_as(t)]


print("1. designs against their float64 fixtures (relative to max |ref|)")
for d in ("design_replace", "design_after_attention", "design_inplace_ffn", "design_kv_memory"):
    fx = FIXTURES / "ttt_moshi" / d
    lm = build_lm(load_json(fx / "config.json"))
    lm.load_state_dict(read_safetensors(fx / "model.safetensors"), strict=True)
    codes = read_safetensors(fx / "codes.safetensors")["codes"]
    ref = read_safetensors(fx / "out.safetensors")
    with torch.no_grad():
        out = lm(codes)
    if not torch.equal(out.mask.to(torch.uint8), ref["mask"]):
        print(f"  {d}: mask differs from the fixture FAIL")
        failures += 1
    report(f"{d} logits", rel_err(masked(out.logits, ref["mask"]), masked(ref["logits"], ref["mask"])), TOL)
    report(f"{d} text_logits",
           rel_err(masked(out.text_logits, ref["text_mask"]), masked(ref["text_logits"], ref["text_mask"])), TOL)

print("2. exported model (tiny_ttt.json: all four designs) against `ttt-moshi forward`")
cfg_path = ROOT / "examples" / "configs" / "tiny_ttt.json"
cfg = load_json(cfg_path)
torch.manual_seed(0)
lm = build_lm(cfg)
with torch.no_grad():
    for name, p in lm.named_parameters():
        # Make every design's branch matter: open the gates, a non-zero In-Place conv, virtual
        # keys that compete with the real ones, non-trivial TTT norms and token weights.
        if name.endswith("ttt_gate.alpha"):
            p.uniform_(0.3, 0.7)
        elif name.endswith("ttt_conv.weight"):
            p.normal_(0.0, 0.3)
        elif name.endswith("virtual_bias"):
            p.zero_()
        elif name.endswith(("ttt_norm_weight", "post_norm.weight")):
            p.add_(0.2 * torch.randn_like(p))
        elif name.endswith("learnable_token_idx"):
            p.normal_(0.0, 0.05)
T = 40
codes = torch.cat([torch.randint(0, cfg["text_card"], (2, 1, T)), torch.randint(0, cfg["card"], (2, cfg["n_q"], T))], 1)
with torch.no_grad():
    out = lm(codes)
exe = sys.argv[sys.argv.index("--ttt-moshi") + 1] if "--ttt-moshi" in sys.argv else None
if exe is None or not os.path.exists(exe):
    print(f"  SKIPPED part 2: no ttt-moshi binary ({exe}); pass --ttt-moshi build/bin/ttt-moshi")
else:
    with tempfile.TemporaryDirectory() as tmp:
        ck, cp, op = (os.path.join(tmp, n) for n in ("model.safetensors", "codes.safetensors", "out.safetensors"))
        write_safetensors(ck, export_state_dict(lm))
        write_safetensors(cp, {"codes": codes})
        r = subprocess.run([exe, "forward", "--config", str(cfg_path), "--weights", ck, "--codes", cp, "--out", op],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  ttt-moshi forward failed ({r.returncode}): {r.stderr.strip()} FAIL")
            failures += 1
        else:
            # Which names the engine did not use (the replaced layer's attention): printed, not hidden.
            for line in (r.stderr + r.stdout).splitlines():
                if "unused" in line or "initialis" in line:
                    print(f"  ttt-moshi: {line.strip()}")
            eng = read_safetensors(op)
            if not torch.equal(eng["mask"].bool(), out.mask):
                print("  mask differs FAIL")
                failures += 1
            m = out.mask
            diff = (masked(eng["logits"], m) - masked(out.logits, m)).abs().max().item()
            tdiff = (masked(eng["text_logits"], out.text_mask) - masked(out.text_logits, out.text_mask)).abs().max().item()
            scale = masked(out.logits, m).abs().max().item()
            report(f"logits max |engine - pytorch| (max |logit| {scale:.2f})", diff, TOL)
            report("text_logits max |engine - pytorch|", tdiff, TOL)
            # The designs change the output: the same model with every branch closed differs.
            plain = build_lm({k: v for k, v in cfg.items() if k != "ttt"})
            plain.load_state_dict({k: v for k, v in lm.state_dict().items() if k in plain.state_dict()}, strict=True)
            with torch.no_grad():
                pdiff = (masked(plain(codes).logits, m) - masked(out.logits, m)).abs().max().item()
            print(f"  (the designs move the logits by {pdiff:.2e} from the plain model with the same weights)")
            if pdiff < 100 * TOL:
                print("  the designs barely change the logits: the comparison would not see them FAIL")
                failures += 1

print("3. gradients reach every TTT parameter")
lm.zero_grad()
out = lm(codes)
loss = torch.nn.functional.cross_entropy(out.logits[out.mask], codes[:, 1:1 + cfg["dep_q"]][out.mask])
loss.backward()
new = [n for n, _ in lm.named_parameters() if any(s in n for s in (".ttt.", "ttt_gate", "ttt_norm_in", "ttt_conv",
                                                                   "ttt_proj", ".memory."))]
bad = [n for n, p in lm.named_parameters() if n in new and (p.grad is None or not torch.isfinite(p.grad).all()
                                                                or p.grad.abs().max() == 0)]
print(f"  {len(new)} TTT parameters, {len(new) - len(bad)} with a finite non-zero gradient"
      + (f"; without: {bad} FAIL" if bad else " ok"))
failures += 1 if bad else 0
print(f"moshi designs: {failures} failures")
sys.exit(1 if failures else 0)
