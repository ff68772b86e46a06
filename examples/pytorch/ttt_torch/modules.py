"""TTTLinear / TTTMLP as nn.Modules with ttt-lm-pytorch's parameter names and shapes, so its
state dicts (and our weight files: docs/weights.md) load unchanged:

  q_proj, k_proj, v_proj, o_proj   nn.Linear(C, C) (bias with proj_bias)
  g_proj                           nn.Linear(C, C, bias=False) (use_gate)
  learnable_ttt_lr_weight [nh, 1, C], learnable_ttt_lr_bias [nh, 1], learnable_token_idx [K]
  ttt_norm_weight, ttt_norm_bias [nh, f], post_norm (nn.LayerNorm(C))
  W1 [nh, f, F], b1 [nh, 1, F] (+ W2 [nh, F, f], b2 [nh, 1, f] for TTT-MLP)

forward(hidden_states [B, L, C]) -> [B, L, C]: the layer over whole sequences from its initial
fast weights (ttt-lm-pytorch's forward without a cache), computed by our C++ kernels (CPU, or CUDA
when the tensors are on the GPU), with gradients for the input and every parameter.
"""
import json
import math

import torch
from torch import nn

from .ops import ttt_layer


class TTTLayer(nn.Module):
    def __init__(self, hidden_size, num_heads, kind="linear", mini_batch_size=16, ttt_base_lr=None,
                 use_gate=False, proj_bias=False, rope_theta=10000.0, ttt_norm_eps=1e-6, post_norm_eps=1e-6,
                 mlp_expansion=4, initializer_range=0.02, checkpoint_group=1, keep_tape=True):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"TTTLayer: kind must be 'linear' or 'mlp', got {kind!r}")
        if hidden_size % num_heads:
            raise ValueError(f"TTTLayer: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        C, nh, K = hidden_size, num_heads, mini_batch_size
        f = C // nh
        F = mlp_expansion * f if kind == "mlp" else f
        self.config = dict(kind=kind, hidden_size=C, num_heads=nh, mini_batch_size=K, mlp_expansion=mlp_expansion,
                           ttt_base_lr=float(ttt_base_lr if ttt_base_lr is not None else (0.1 if kind == "mlp" else 1.0)),
                           use_gate=bool(use_gate), proj_bias=bool(proj_bias), rope_theta=float(rope_theta),
                           ttt_norm_eps=float(ttt_norm_eps), post_norm_eps=float(post_norm_eps))
        self._config_json = json.dumps(self.config, sort_keys=True)
        self.checkpoint_group, self.keep_tape = checkpoint_group, keep_tape
        self.hidden_size, self.num_heads, self.head_dim, self.mini_batch_size = C, nh, f, K
        std = initializer_range
        self.q_proj = nn.Linear(C, C, bias=proj_bias)
        self.k_proj = nn.Linear(C, C, bias=proj_bias)
        self.v_proj = nn.Linear(C, C, bias=proj_bias)
        self.o_proj = nn.Linear(C, C, bias=proj_bias)
        if use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(nh, 1, C))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(nh, 1))
        self.learnable_token_idx = nn.Parameter(torch.zeros(K))
        self.ttt_norm_weight = nn.Parameter(torch.ones(nh, f))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(nh, f))
        self.post_norm = nn.LayerNorm(C, eps=post_norm_eps)
        self.W1 = nn.Parameter(torch.empty(nh, f, F))
        self.b1 = nn.Parameter(torch.zeros(nh, 1, F))
        if kind == "mlp":
            self.W2 = nn.Parameter(torch.empty(nh, F, f))
            self.b2 = nn.Parameter(torch.zeros(nh, 1, f))
        # ttt-lm-pytorch's initialisation: N(0, initializer_range) linears and fast weights,
        # zero biases, unit norms.
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() >= 2 or name in ("W1", "W2"):
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def ttt_names(self):
        """The parameter names the C++ op reads (all of this module's parameters)."""
        return [n for n, _ in self.named_parameters()]

    def forward(self, hidden_states):
        names = self.ttt_names()
        params = dict(self.named_parameters())
        return ttt_layer(hidden_states, [params[n] for n in names], names, self._config_json, self.checkpoint_group,
                         self.keep_tape)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class TTTLinear(TTTLayer):
    def __init__(self, hidden_size, num_heads, **kw):
        super().__init__(hidden_size, num_heads, kind="linear", **kw)


class TTTMLP(TTTLayer):
    def __init__(self, hidden_size, num_heads, **kw):
        super().__init__(hidden_size, num_heads, kind="mlp", **kw)
