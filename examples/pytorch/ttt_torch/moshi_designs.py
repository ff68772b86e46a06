"""The TTT-in-Moshi designs (docs/designs.md) as PyTorch modules around moshi's own LMModel
(moshi 0.2.13), for training. The state-dict names are exactly those the C++ engine loads
(docs/weights.md), so a checkpoint trained here loads into `ttt-moshi` unchanged:

  replace          transformer.layers.{i}.ttt.*, .ttt_gate.alpha [D]
  after_attention  transformer.layers.{i}.ttt.*, .ttt_gate.alpha [D], .ttt_norm_in.* (the model's norm)
  inplace_ffn      transformer.layers.{i}.gating.ttt_conv.weight [D, 1, k], .gating.ttt_proj.weight [D, D]
  kv_memory        transformer.layers.{i}.self_attn.memory.* (the TTT module), .memory.to_k.weight,
                   .memory.to_v.weight [D, D], .memory.virtual_bias [H]

build_lm(config) reads the engine's config.json (moshi's keys plus the "ttt" list, parsed with the
engine's defaults), makes moshi's LMModel and turns the listed temporal layers into their design in
place: the design's modules are added to moshi's StreamingTransformerLayer and its class is switched
to a subclass that overrides the attention (A, B, D) or feed-forward (C) block. The rest is moshi's
code. The TTT modules run our C++ kernels (ttt_torch.TTTLayer) with gradients.

Scope: teacher-forced forward (training, LMModel.forward on whole sequences from frame 0). Moshi's
streaming (LMGen, step by step) is refused with a clear error: stream with `ttt-moshi generate`.
"""
import json
import math

import torch
from torch import nn

from .modules import TTTLayer

DESIGNS = ("replace", "after_attention", "inplace_ffn", "kv_memory")
_TTT_KEYS = {"kind", "num_heads", "mini_batch_size", "base_lr", "mlp_expansion", "use_gate", "rope_theta"}
_KEYS = {
    "replace": _TTT_KEYS | {"gate_alpha_init"},
    "after_attention": _TTT_KEYS | {"gate_alpha_init"},
    "inplace_ffn": {"chunk_size", "lr", "conv_kernel", "target_proj"},
    "kv_memory": _TTT_KEYS | {"recent", "num_virtual", "virtual_bias_init"},
}
# Keys of the engine's config.json that are not LMModel arguments (moshi's loader drops them too).
_NOT_LM_KWARGS = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                  "lm_gen_config", "tts_config", "stt_config", "model_id", "ttt", "depformer_causal"}


def _check_entry(i, e, num_layers):
    where = f"config: ttt[{i}]"
    for k in ("layers", "design"):
        if k not in e:
            raise ValueError(f"{where}: missing key '{k}'")
    d = e["design"]
    if d not in DESIGNS:
        raise ValueError(f"{where}: unknown design '{d}' (one of {', '.join(DESIGNS)})")
    for k in e:
        if k not in ("layers", "design") and k not in _KEYS[d]:
            raise ValueError(f"{where}: key '{k}' does not apply to design '{d}'")
    if not e["layers"] or any(not isinstance(l, int) or not 0 <= l < num_layers for l in e["layers"]):
        raise ValueError(f"{where}: 'layers' must be a non-empty list of ints in [0, {num_layers})")


class Gate(nn.Module):
    """ttt_gate: alpha [D] (fp32); the branch is scaled by tanh(alpha)."""

    def __init__(self, dim, init):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, u):
        return torch.tanh(self.alpha).to(u.dtype) * u


def _ttt_module(e, dim, model_heads):
    kind = e.get("kind", "linear")
    return TTTLayer(dim, e.get("num_heads", model_heads), kind=kind, mini_batch_size=e.get("mini_batch_size", 16),
                    ttt_base_lr=e.get("base_lr"), mlp_expansion=e.get("mlp_expansion", 4),
                    use_gate=e.get("use_gate", False), rope_theta=e.get("rope_theta", 10000.0))


def _no_streaming(layer, design):
    if layer._streaming_state is not None:
        raise RuntimeError(f"ttt_torch.moshi_designs: design '{design}' runs teacher-forced (whole sequences from "
                           "frame 0) in PyTorch; stream with `ttt-moshi generate` (the C++ engine)")


class TTTMemory(TTTLayer):
    """D's memory: the TTT module (its names at self_attn.memory.*) plus to_k, to_v [D, D] and
    virtual_bias [H], which the TTT op does not read."""

    def __init__(self, dim, model_heads, e):
        kind = e.get("kind", "linear")
        super().__init__(dim, e.get("num_heads", model_heads), kind=kind, mini_batch_size=e.get("mini_batch_size", 16),
                         ttt_base_lr=e.get("base_lr"), mlp_expansion=e.get("mlp_expansion", 4),
                         use_gate=e.get("use_gate", False), rope_theta=e.get("rope_theta", 10000.0))
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.to_k.weight, 0.0, 0.02)
        nn.init.normal_(self.to_v.weight, 0.0, 0.02)
        self.virtual_bias = nn.Parameter(torch.full((model_heads,), float(e.get("virtual_bias_init", -30.0))))
        self.recent, self.num_virtual = int(e.get("recent", 100)), int(e.get("num_virtual", 10))

    def ttt_names(self):
        return [n for n in super().ttt_names() if n not in ("to_k.weight", "to_v.weight", "virtual_bias")]


def _layer_classes():
    from moshi.modules.transformer import StreamingTransformerLayer, apply_weights_per_step

    class ReplaceLayer(StreamingTransformerLayer):
        """A: x += tanh(α) ⊙ TTT(N1(x)) instead of attention."""

        def _sa_block(self, x):
            _no_streaming(self, "replace")
            return x + self.ttt_gate(self.ttt(self.norm1(x)).to(x))

    class AfterAttentionLayer(StreamingTransformerLayer):
        """B: the pretrained attention, then x += tanh(α) ⊙ TTT(Nt(x))."""

        def _sa_block(self, x):
            _no_streaming(self, "after_attention")
            x = super()._sa_block(x)
            return x + self.ttt_gate(self.ttt(self.ttt_norm_in(x)).to(x))

    class InplaceFfnLayer(StreamingTransformerLayer):
        """C: linear_out is a fast weight updated once per chunk of C frames:
        W_j = W_out + lr Σ_{i<j} V_iᵀ Z_i, V = conv_chunk(E) · P, out_t = Z_t W_jᵀ (t in chunk j)."""

        def _ff_block(self, x):
            _no_streaming(self, "inplace_ffn")
            E = self._ttt_embeddings()  # [B, T, D] the frame's token-embedding sum
            g = self.gating
            h = self.norm2(x)
            z = g.linear_in(h)
            B, T, _ = z.shape
            z = z.view(B, T, 2, -1)
            z = g.activation(z[..., 0, :]) * z[..., 1, :]  # [B, T, Hf]
            C, k, lr = self.ttt_chunk, self.ttt_conv_kernel, self.ttt_lr
            W = g.linear_out.weight.float().unsqueeze(0).expand(B, -1, -1)  # [B, D, Hf]
            outs = []
            for t0 in range(0, T, C):
                zc = z[:, t0:t0 + C]
                outs.append(torch.einsum("bth,bdh->btd", zc.float(), W).to(z))
                if t0 + C <= T:  # a completed chunk updates the weights of the later chunks
                    # depthwise conv over the chunk only, zero-padded at its edges
                    ec = E[:, t0:t0 + C].float().transpose(1, 2)  # [B, D, C]
                    et = nn.functional.conv1d(ec, g.ttt_conv.weight.float(), padding=k // 2, groups=ec.shape[1])
                    v = et.transpose(1, 2)  # [B, C, D]
                    if g.ttt_proj is not None:
                        v = v @ g.ttt_proj.weight.float()  # used as stored: V[t, e] = Σ_d Ẽ[t, d] P[d, e]
                    W = W + lr * torch.einsum("btd,bth->bdh", v, zc.float())
            update = torch.cat(outs, dim=1)
            return x + self.layer_scale_2(update)

    class KvMemoryLayer(StreamingTransformerLayer):
        """D: attention over the R most recent exact keys plus N virtual keys/values made by a TTT
        memory of the layer input: k̂_p = RoPE(m_p W_kᵀ, p − R), v̂_p = m_p W_vᵀ, m = TTT(N1(x)); query t
        sees virtual p for 0 <= t − p < N (logit + β_h) and recent s for 0 <= t − s < R, one softmax."""

        def _sa_block(self, x):
            _no_streaming(self, "kv_memory")
            sa, mem = self.self_attn, self.self_attn.memory
            u = self.norm1(x)
            B, T, D = u.shape
            H = sa.num_heads
            hd = D // H
            proj = apply_weights_per_step(sa.in_projs, sa.weights_per_step_schedule, u, 0)
            q, k, v = proj.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
            zero = torch.zeros(B, device=u.device, dtype=torch.long)
            if sa.rope:
                q, k = sa.rope(q, k, zero, time_before_heads=False)
            t = torch.arange(T, device=u.device)
            delta = t.view(-1, 1) - t.view(1, -1)  # query t - key s
            logits = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(hd)
            logits = logits.masked_fill(~((delta >= 0) & (delta < mem.recent)), float("-inf"))
            values = v
            if mem.num_virtual > 0:
                m = mem(u)
                kv_ = mem.to_k(m).view(B, T, H, hd).transpose(1, 2)
                vv = mem.to_v(m).view(B, T, H, hd).transpose(1, 2)
                if sa.rope:
                    kv_, _ = sa.rope(kv_, kv_, zero - mem.recent, time_before_heads=False)
                lv = torch.einsum("bhtd,bhsd->bhts", q, kv_) / math.sqrt(hd) + mem.virtual_bias.view(1, H, 1, 1).to(q)
                lv = lv.masked_fill(~((delta >= 0) & (delta < mem.num_virtual)), float("-inf"))
                logits = torch.cat([lv, logits], dim=-1)
                values = torch.cat([vv, v], dim=2)
            attn = torch.softmax(logits.float(), dim=-1).to(q)
            out = torch.einsum("bhts,bhsd->bhtd", attn, values).transpose(1, 2).reshape(B, T, D)
            out = apply_weights_per_step(sa.out_projs, sa.weights_per_step_schedule, out, 0)
            return x + self.layer_scale_1(out)

    return ReplaceLayer, AfterAttentionLayer, InplaceFfnLayer, KvMemoryLayer


class _EmbeddingTap:
    """Holds the temporal transformer's input (the frame's token-embedding sum E, before any
    positional embedding) for In-Place TTT, captured by a forward pre-hook."""

    def __init__(self):
        self.value = None

    def __call__(self, module, args, kwargs=None):
        self.value = args[0]


def lm_kwargs(config):
    kw = {k: v for k, v in config.items() if k not in _NOT_LM_KWARGS}
    if "demux_second_stream" in kw:
        kw["demux_second_text_stream"] = kw.pop("demux_second_stream")
    return kw


def build_lm(config, device="cpu", dtype=torch.float32):
    """moshi's LMModel for the engine's config (a dict or a path to config.json), with the designs of
    its "ttt" list. Every new weight is initialised by the engine's rules for a missing weight
    (docs/weights.md) in distribution; load a checkpoint with load_state_dict."""
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import create_norm_fn

    lm = LMModel(device=device, dtype=dtype, **lm_kwargs(config))
    layers = lm.transformer.layers
    D, H = config["dim"], config["num_heads"]
    ReplaceLayer, AfterAttentionLayer, InplaceFfnLayer, KvMemoryLayer = _layer_classes()
    seen = set()
    tap = None
    for n, e in enumerate(config.get("ttt", [])):
        _check_entry(n, e, len(layers))
        d = e["design"]
        for i in e["layers"]:
            if i in seen:
                raise ValueError(f"config: ttt[{n}]: layer {i} appears in more than one entry")
            seen.add(i)
            layer = layers[i]
            if d in ("replace", "after_attention"):
                layer.ttt = _ttt_module(e, D, H).to(device)
                layer.ttt_gate = Gate(D, e.get("gate_alpha_init", 0.1 if d == "replace" else 0.05)).to(device)
                if d == "after_attention":
                    layer.ttt_norm_in = create_norm_fn(config["norm"], D, device=device, dtype=dtype)
                layer.__class__ = ReplaceLayer if d == "replace" else AfterAttentionLayer
            elif d == "inplace_ffn":
                g = layer.gating
                if g is None or isinstance(g, nn.ModuleList):
                    raise ValueError(f"config: ttt[{n}]: inplace_ffn needs a gated FFN with one weight set "
                                     f"(layer {i} has {'none' if g is None else 'per-step weights'})")
                if not isinstance(layer.layer_scale_2, nn.Identity):
                    raise ValueError(f"config: ttt[{n}]: inplace_ffn refuses LayerScale (layer {i})")
                k = e.get("conv_kernel", 5)
                if k % 2 == 0 or not 1 <= k <= 63:
                    raise ValueError(f"config: ttt[{n}]: conv_kernel must be odd in [1, 63], got {k}")
                g.ttt_conv = nn.Conv1d(D, D, k, groups=D, bias=False, device=device, dtype=torch.float32)
                nn.init.zeros_(g.ttt_conv.weight)  # the pretrained layer exactly (docs/designs.md)
                g.ttt_proj = None
                if e.get("target_proj", True):
                    g.ttt_proj = nn.Linear(D, D, bias=False, device=device, dtype=torch.float32)
                    with torch.no_grad():
                        g.ttt_proj.weight.zero_()
                        g.ttt_proj.weight.diagonal().normal_(0.0, 0.02)
                layer.ttt_chunk, layer.ttt_conv_kernel = e.get("chunk_size", 256), k
                layer.ttt_lr = float(e.get("lr", 0.001))
                if tap is None:
                    tap = _EmbeddingTap()
                    lm.transformer.register_forward_pre_hook(tap)
                layer._ttt_embeddings = (lambda t=tap: t.value)
                layer.__class__ = InplaceFfnLayer
            else:  # kv_memory
                if layer.self_attn.kv_repeat != 1:
                    raise ValueError(f"config: ttt[{n}]: kv_memory needs kv_repeat = 1 (layer {i})")
                if int(e.get("recent", 100)) < 1 or not 0 <= int(e.get("num_virtual", 10)) <= 4096:
                    raise ValueError(f"config: ttt[{n}]: recent must be >= 1 and num_virtual in [0, 4096]")
                layer.self_attn.memory = TTTMemory(D, H, e).to(device)
                layer.__class__ = KvMemoryLayer
    return lm


def export_state_dict(lm):
    """name -> contiguous float32 CPU tensor of every weight, under the names `ttt-moshi` loads
    (write it with safetensors' save_file, or tests/common.write_safetensors)."""
    out = {}
    for name, t in lm.state_dict().items():
        if t.is_floating_point():
            out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out
