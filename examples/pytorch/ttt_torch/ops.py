"""Autograd over the `torch.ops.ttt` custom ops: ttt_layer(x, params, names, config)."""
import json

import torch

from . import _ext


class TttLayerFunction(torch.autograd.Function):
    """y = TTT layer(x; params), its backward our C++ backward (ttt_backward). With keep_tape the
    forward keeps the layer's tape (layer_forward_train: projections, inner output, gate
    pre-activation, fast-weight checkpoints every checkpoint_group mini-batches) for the backward
    (layer_backward_tape); without it nothing is kept and the backward re-runs the training forward
    (layer_backward: less memory, one more forward). Not itself differentiable (no double backward)."""

    @staticmethod
    def forward(ctx, x, config, names, checkpoint_group, keep_tape, *params):
        _ext.load()
        ctx.config, ctx.names, ctx.checkpoint_group = config, names, checkpoint_group
        ctx.n_params = len(params)
        if keep_tape and any(ctx.needs_input_grad):
            y, *tape = torch.ops.ttt.layer_forward_train(x, list(params), list(names), config, checkpoint_group)
            ctx.save_for_backward(x, *params, *tape)
            ctx.has_tape = True
            return y
        ctx.save_for_backward(x, *params)
        ctx.has_tape = False
        return torch.ops.ttt.layer_forward(x, list(params), list(names), config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *rest = ctx.saved_tensors
        params, tape = rest[:ctx.n_params], rest[ctx.n_params:]
        if ctx.has_tape:
            grads = torch.ops.ttt.layer_backward_tape(x, list(params), list(ctx.names), ctx.config, dy.contiguous(),
                                                      list(tape), ctx.checkpoint_group)
        else:
            grads = torch.ops.ttt.layer_backward(x, list(params), list(ctx.names), ctx.config, dy.contiguous(),
                                                 ctx.checkpoint_group)
        return (grads[0], None, None, None, None, *grads[1:])


def ttt_layer(x, params, names, config, checkpoint_group=1, keep_tape=True):
    """The TTT layer (TTT-Linear / TTT-MLP as ttt-lm-pytorch computes it, whole sequences from the
    initial fast weights) on x [B, L, C]. params: tensors under `names` (ttt-lm-pytorch's names and
    shapes); config: a dict or JSON string with TttConfig's keys (kind, hidden_size, num_heads,
    mini_batch_size, ttt_base_lr, use_gate, proj_bias, rope_theta, ttt_norm_eps, post_norm_eps).
    keep_tape: keep the forward's tape for the backward (default) or recompute it there."""
    _ext.load()
    if not isinstance(config, str):
        config = json.dumps(config)
    return TttLayerFunction.apply(x, config, tuple(names), int(checkpoint_group), bool(keep_tape), *params)
