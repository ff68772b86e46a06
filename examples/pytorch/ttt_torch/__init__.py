"""PyTorch front end of the ttt library: the TTT layer as custom ops with autograd
(ops.ttt_layer), drop-in TTTLinear / TTTMLP modules with ttt-lm-pytorch's parameter names
(modules), and the TTT-in-Moshi designs around moshi's LMModel (moshi_designs)."""
from .ops import ttt_layer, TttLayerFunction  # noqa: F401
from .modules import TTTLayer, TTTLinear, TTTMLP  # noqa: F401
