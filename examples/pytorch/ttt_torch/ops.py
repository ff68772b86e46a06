"""Autograd over the `torch.ops.ttt` custom ops: ttt_layer(x, params, names, config)."""
import json

import torch

from . import _ext


class TttLayerFunction(torch.autograd.Function):
    """y = TTT layer(x; params). The backward is our C++ backward (ttt_backward), which
    re-runs the training forward (no tape is kept between the two ops); it is not itself
    differentiable (no double backward)."""

    @staticmethod
    def forward(ctx, x, config, names, checkpoint_group, *params):
        _ext.load()
        ctx.config, ctx.names, ctx.checkpoint_group = config, names, checkpoint_group
        ctx.save_for_backward(x, *params)
        return torch.ops.ttt.layer_forward(x, list(params), list(names), config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        grads = torch.ops.ttt.layer_backward(x, list(params), list(ctx.names), ctx.config, dy.contiguous(),
                                             ctx.checkpoint_group)
        return (grads[0], None, None, None, *grads[1:])


def ttt_layer(x, params, names, config, checkpoint_group=1):
    """The TTT layer (TTT-Linear / TTT-MLP as ttt-lm-pytorch computes it, whole sequences from the
    initial fast weights) on x [B, L, C]. params: tensors under `names` (ttt-lm-pytorch's names and
    shapes); config: a dict or JSON string with TttConfig's keys (kind, hidden_size, num_heads,
    mini_batch_size, ttt_base_lr, use_gate, proj_bias, rope_theta, ttt_norm_eps, post_norm_eps)."""
    _ext.load()
    if not isinstance(config, str):
        config = json.dumps(config)
    return TttLayerFunction.apply(x, config, tuple(names), int(checkpoint_group), *params)
