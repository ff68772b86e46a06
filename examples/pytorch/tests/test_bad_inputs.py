"""Bad input to the ops gets one clear error (a RuntimeError naming the problem), never a crash:
a missing parameter, a mis-shaped one, x of the wrong width or dtype, malformed or invalid config
JSON, names and tensors that do not pair up, dy of another shape, a tape of the wrong size, a
checkpoint group < 1."""
import sys

from common import require_torch, threads

torch = require_torch()
threads()
import ttt_torch  # noqa: E402
from ttt_torch import _ext  # noqa: E402

_ext.load()
m = ttt_torch.TTTLinear(16, 2, mini_batch_size=4)
names = m.ttt_names()
ps = dict(m.named_parameters())
params = [ps[n] for n in names]
cfg = m._config_json
x = torch.randn(1, 5, 16)
fwd, bwd = torch.ops.ttt.layer_forward, torch.ops.ttt.layer_backward
drop = names.index("W1")
cases = [
    ("missing W1", lambda: fwd(x, params[:drop] + params[drop + 1:], names[:drop] + names[drop + 1:], cfg),
     "missing tensor 'W1'"),
    ("mis-shaped W1", lambda: fwd(x, [torch.randn(2, 8, 9) if n == "W1" else p for n, p in zip(names, params)],
                                  names, cfg), "'W1' has shape [2, 8, 9], expected [2, 8, 8]"),
    ("x width", lambda: fwd(torch.randn(1, 5, 15), params, names, cfg), "x must be a non-empty [B, L, 16]"),
    ("x dtype", lambda: fwd(x.long(), params, names, cfg), "'x' must be floating point"),
    ("config JSON", lambda: fwd(x, params, names, "{kind"), "config is not valid JSON"),
    ("config value", lambda: fwd(x, params, names, '{"kind": "rnn", "hidden_size": 16, "num_heads": 2}'),
     "key 'kind' must be \"linear\" or \"mlp\""),
    ("names count", lambda: fwd(x, params, names[:-1], cfg), "names for"),
    ("dy shape", lambda: bwd(x, params, names, cfg, torch.randn(1, 4, 16), 1), "dy"),
    ("tape size", lambda: torch.ops.ttt.layer_backward_tape(x, params, names, cfg, torch.randn(1, 5, 16),
                                                           [torch.empty(0)] * 6, 1), "the tape has 7 tensors"),
    ("checkpoint group", lambda: bwd(x, params, names, cfg, torch.randn(1, 5, 16), 0), "checkpoint_group"),
]
failures = 0
for what, f, expect in cases:
    try:
        f()
        print(f"  {what}: no error FAIL")
        failures += 1
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        ok = expect in msg
        failures += 0 if ok else 1
        print(f"  {what}: {msg[:150]} {'ok' if ok else 'FAIL (expected ' + repr(expect) + ')'}")
print(f"bad inputs: {len(cases)} cases, {failures} failures")
sys.exit(1 if failures else 0)
