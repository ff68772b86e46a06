#!/usr/bin/env python3
"""Our TTTLinear / TTTMLP (ttt_torch, the C++ kernels) against ttt-lm-pytorch's own module, out of
tree: its ttt.py is read from --ttt-py (a checkout of github.com/test-time-training/ttt-lm-pytorch)
or downloaded with --download into a temporary directory; nothing of it is copied into this
repository. For random layers (linear / mlp, with and without the gate, lengths with a remainder),
our state dict is loaded into its module with load_state_dict(strict=True) (the names and shapes
are the same), its forward and autograd run in float64, ours in float32, and y, grad.x and every
parameter gradient are compared (max |ours - theirs| / max |theirs|, pass at 1e-5).

ttt.py imports Hugging Face transformers for its config and model base classes only; when
transformers is not installed, this script provides minimal stand-ins for those names (the TTT
layers themselves do not use them).

  python3 examples/pytorch/tools/compare_ttt_lm_pytorch.py --ttt-py /path/to/ttt-lm-pytorch/ttt.py
  python3 examples/pytorch/tools/compare_ttt_lm_pytorch.py --download
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import types
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
URL = "https://raw.githubusercontent.com/test-time-training/ttt-lm-pytorch/main/ttt.py"


def stub_transformers():
    """Minimal stand-ins for the transformers names ttt.py imports (config/model plumbing)."""
    import torch.nn as nn
    tf = types.ModuleType("transformers")

    class PretrainedConfig:
        def __init__(self, **kwargs):
            for k, v in kwargs.items():
                setattr(self, k, v)

    class PreTrainedModel(nn.Module):
        def __init__(self, config, *a, **k):
            super().__init__()
            self.config = config

    class ModelOutput(dict):
        pass

    tf.PretrainedConfig = PretrainedConfig
    acts = types.ModuleType("transformers.activations")
    acts.ACT2FN = {"silu": nn.SiLU(), "gelu": nn.GELU()}
    outs = types.ModuleType("transformers.modeling_outputs")
    outs.BaseModelOutputWithPast = outs.CausalLMOutputWithPast = ModelOutput
    mu = types.ModuleType("transformers.modeling_utils")
    mu.PreTrainedModel = PreTrainedModel
    ut = types.ModuleType("transformers.utils")
    ut.ModelOutput = ModelOutput
    import logging
    ut.logging = types.SimpleNamespace(get_logger=logging.getLogger)
    iu = types.ModuleType("transformers.utils.import_utils")
    iu.is_causal_conv1d_available = lambda: False
    for name, mod in {"transformers": tf, "transformers.activations": acts, "transformers.modeling_outputs": outs,
                      "transformers.modeling_utils": mu, "transformers.utils": ut,
                      "transformers.utils.import_utils": iu}.items():
        sys.modules[name] = mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ttt-py", help="path to ttt-lm-pytorch's ttt.py")
    ap.add_argument("--download", action="store_true", help=f"download ttt.py from {URL}")
    ap.add_argument("--skip-missing", action="store_true",
                    help="exit 77 (a CTest skip) with a message when --ttt-py does not exist")
    args = ap.parse_args()
    if args.ttt_py and not os.path.exists(args.ttt_py) and args.skip_missing:
        print(f"SKIPPED: no ttt-lm-pytorch ttt.py at {args.ttt_py} (copy it from a checkout of "
              "github.com/test-time-training/ttt-lm-pytorch, or set TTT_PY at configure time)", flush=True)
        return 77
    import torch
    import ttt_torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    path = args.ttt_py
    if path is None:
        if not args.download:
            ap.error("give --ttt-py PATH or --download")
        path = os.path.join(tempfile.mkdtemp(), "ttt.py")
        try:
            urllib.request.urlretrieve(URL, path)
        except Exception as e:
            print(f"SKIPPED: cannot download {URL} ({e})")
            return 77
    try:
        import transformers  # noqa: F401
    except ImportError:
        stub_transformers()
    spec = importlib.util.spec_from_file_location("ttt_lm_pytorch_ttt", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    failures, worst_all = 0, 0.0
    for kind, gate, C, nh, K, L in (("linear", False, 64, 4, 16, 48), ("linear", True, 64, 4, 8, 29),
                                    ("mlp", False, 64, 4, 16, 37), ("mlp", True, 32, 2, 8, 24)):
        torch.manual_seed(L)
        ours = ttt_torch.TTTLayer(C, nh, kind=kind, mini_batch_size=K, use_gate=gate)
        with torch.no_grad():  # non-trivial values everywhere
            for n, p in ours.named_parameters():
                p.add_((0.02 if n == "learnable_token_idx" else 0.1) * torch.randn_like(p))
        cfg = ref.TTTConfig(hidden_size=C, num_attention_heads=nh, mini_batch_size=K, use_gate=gate,
                            ttt_layer_type=kind, ttt_base_lr=1.0 if kind == "linear" else 0.1, pre_conv=False,
                            share_qk=False, max_position_embeddings=4096)
        theirs = (ref.TTTLinear if kind == "linear" else ref.TTTMLP)(cfg, layer_idx=0).double()
        theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()}, strict=True)
        x = torch.randn(2, L, C, dtype=torch.float64)
        dy = torch.randn(2, L, C, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        yr = theirs(xr, position_ids=torch.arange(L).unsqueeze(0).expand(2, L))
        (yr * dy).sum().backward()
        xo = x.float().requires_grad_(True)
        yo = ours(xo)
        (yo * dy.float()).sum().backward()
        pairs = [("y", yo, yr), ("grad.x", xo.grad, xr.grad)]
        tp = dict(theirs.named_parameters())
        pairs += [("grad." + n, p.grad, tp[n].grad) for n, p in ours.named_parameters()]
        worst, worst_name = 0.0, ""
        for name, a, b in pairs:
            e = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))
            if e > worst:
                worst, worst_name = e, name
        ok = worst <= 1e-5
        failures += 0 if ok else 1
        worst_all = max(worst_all, worst)
        print(f"{kind:6s} gate={gate!s:5s} C {C} nh {nh} K {K} L {L}: {len(pairs)} tensors, worst {worst:.2e} "
              f"({worst_name}) {'ok' if ok else 'FAIL'}")
    print(f"ttt-lm-pytorch ({path}) vs ttt_torch: worst {worst_all:.2e}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
