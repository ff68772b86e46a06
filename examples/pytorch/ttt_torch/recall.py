"""The long-range recall task of issue 15, part 4 (docs/training.md, "The proof: recall beyond the
ring"): the model configs, the synthetic streams, the loss and the recall-against-distance measure.
Used by examples/pytorch/train_recall.py and its CTest test.

The task, in Moshi's streams (codes [B, 1 + n_q, T], n_q = 3, dep_q = 2, all delays 0):
  user stream (codebook 3, card 64): filler tokens (random in [V + 1, 64)) except
      a codeword c in [0, V) at a store frame s and the QUERY token V at frame s + d;
  text stream (the model's output): PAD (0) except 1 + c at frame s + d + 1 (the answer);
  model audio (codebooks 1, 2): token 0 throughout (a trivial target, there because moshi's
      LMModel needs a depformer of at least two codebooks).
LMModel predicts frame t from frames < t, so the answer at s + d + 1 is predicted from the query
at s + d; the codeword entered the model d frames earlier. Episodes follow one another: the next
codeword is stored after the answer, so a query always asks for the most recent codeword, and the
codeword is in the model's input only at its store frame and (teacher-forced or generated) at its
answer frame. Chance is 1 / V.

With context c and L attention layers, frame t reaches back at most L (c - 1) frames (moshi's mask
is 0 <= t - s < c per layer): 2 x 15 = 30 frames for the shipped configs.
"""
import math

import numpy as np

V = 16            # codewords
CARD = 64         # audio card; user tokens: codewords 0..V-1, QUERY = V, filler V+1..CARD-1
QUERY = V
TEXT_CARD = 32    # text tokens: PAD = 0, answers 1..V
PAD = 0
USER = 3          # the user stream's codebook index in codes [B, 4, T]
CHANCE = 1.0 / V

# Distance buckets of the report: [lo, hi] inclusive.
BUCKETS = [(1, 15), (16, 30), (31, 64), (65, 128), (129, 256), (257, 512), (513, 1024), (1025, 2048), (2049, 4096),
           (4097, 8192)]


def model_config(design="replace", kind="linear", layer=1, dim=128, num_layers=2, num_heads=4, context=16,
                 ttt_heads=2, mini_batch=16, base_lr=None, rope_theta=None):
    """The engine's config.json (moshi's keys plus the "ttt" list) of the recall model; design None
    is the control (the same model without TTT)."""
    cfg = {
        "moshi_name": "ttt-recall-" + (design or "control"), "model_type": "moshi",
        "dim": dim, "text_card": TEXT_CARD, "existing_text_padding_id": PAD, "n_q": 3, "dep_q": 2, "card": CARD,
        "num_heads": num_heads, "num_layers": num_layers, "hidden_scale": 4.125, "causal": True,
        "layer_scale": None, "context": context, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 32, "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_layer_scale": None,
        "depformer_multi_linear": True, "depformer_context": 2, "depformer_max_period": 10000,
        "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
        "delays": [0, 0, 0, 0],
        "lm_gen_config": {"temp": 0.8, "temp_text": 0.7, "top_k": 50, "top_k_text": 25},
    }
    if design is not None:
        e = {"layers": [layer], "design": design, "kind": kind, "num_heads": ttt_heads, "mini_batch_size": mini_batch}
        if base_lr is not None:
            e["base_lr"] = base_lr
        if rope_theta is not None:
            e["rope_theta"] = rope_theta
        cfg["ttt"] = [e]
    return cfg


def receptive_field(cfg):
    """How far back (frames) attention alone reaches: num_layers x (context - 1)."""
    return cfg["num_layers"] * (cfg["context"] - 1)


def _distance(rng, lo, hi):
    """An integer in [lo, hi], log-uniform."""
    if hi <= lo:
        return lo
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _bucketed_distance(rng, dmin, dmax):
    """A bucket of BUCKETS (clipped to [dmin, dmax]) uniformly, then a distance log-uniform in it:
    the long buckets get as many queries as the short ones (evaluation)."""
    cands = [(max(lo, dmin), min(hi, dmax)) for lo, hi in BUCKETS if lo <= dmax and hi >= dmin]
    lo, hi = cands[int(rng.integers(0, len(cands)))]
    return _distance(rng, lo, hi)


def make_stream(rng, T, dmin, dmax, first_store=None, balanced=False):
    """One stream of T frames. Returns user [T], text [T] (int64) and the queries as an int64
    array [n, 3] of (answer frame, distance d, codeword). Distances are log-uniform in [dmin, dmax]
    (training), or with `balanced` a bucket of BUCKETS uniformly, then log-uniform in it (evaluation)."""
    user = rng.integers(V + 1, CARD, T)
    text = np.full(T, PAD, dtype=np.int64)
    queries = []
    t = int(rng.integers(0, 8)) if first_store is None else first_store
    while True:
        room = T - 2 - t  # the query at t + d and its answer at t + d + 1 must fit
        if room < dmin:
            break
        d = (_bucketed_distance if balanced else _distance)(rng, dmin, min(dmax, room))
        c = int(rng.integers(0, V))
        user[t], user[t + d], text[t + d + 1] = c, QUERY, 1 + c
        queries.append((t + d + 1, d, c))
        t = t + d + 2 + int(rng.integers(0, 4))
    return user.astype(np.int64), text, np.array(queries, dtype=np.int64).reshape(-1, 3)


def make_codes(rng, B, T, dmin, dmax, balanced=False):
    """codes [B, 4, T] (text, model audio x 2, user) and the queries [n, 4] of (item, answer frame,
    distance, codeword)."""
    import torch
    codes = np.zeros((B, 4, T), dtype=np.int64)
    qs = []
    for b in range(B):
        user, text, q = make_stream(rng, T, dmin, dmax, balanced=balanced)
        codes[b, 0], codes[b, USER] = text, user
        qs.append(np.concatenate([np.full((len(q), 1), b, dtype=np.int64), q], axis=1))
    return torch.from_numpy(codes), torch.from_numpy(np.concatenate(qs, axis=0))


def loss_terms(out, codes, queries):
    """(loss, answer loss, answer accuracy): the mean cross-entropy of the answers, plus that of the
    other text frames (PAD), plus that of the model's audio codebooks, each averaged on its own so
    the rare answers are not drowned by the padding."""
    import torch
    import torch.nn.functional as F
    text_logits = out.text_logits[:, 0].float()  # [B, T, TEXT_CARD]
    b, t = queries[:, 0], queries[:, 1]
    ans_logits = text_logits[b, t]
    ans_target = codes[b, 0, t]
    ans = F.cross_entropy(ans_logits, ans_target)
    is_ans = torch.zeros(codes.shape[0], codes.shape[2], dtype=torch.bool)
    is_ans[b, t] = True
    pad = F.cross_entropy(text_logits[~is_ans], codes[:, 0][~is_ans])
    audio = F.cross_entropy(out.logits.float()[out.mask], codes[:, 1:3][out.mask])
    acc = (ans_logits.argmax(-1) == ans_target).float().mean()
    return ans + pad + audio, ans, acc


def bucket_of(d):
    for i, (lo, hi) in enumerate(BUCKETS):
        if lo <= d <= hi:
            return i
    return None


def recall_table(distances, correct):
    """[(lo, hi, n, accuracy)] per bucket that has queries."""
    distances, correct = np.asarray(distances), np.asarray(correct, dtype=bool)
    rows = []
    for lo, hi in BUCKETS:
        m = (distances >= lo) & (distances <= hi)
        if m.any():
            rows.append((lo, hi, int(m.sum()), float(correct[m].mean())))
    return rows


def answers_correct(text_logits, codes, queries):
    """Per query: does the argmax of the text logits at its answer frame equal the codeword?"""
    b, t = queries[:, 0], queries[:, 1]
    return (text_logits[b, 0, t].argmax(-1) == codes[b, 0, t]).numpy()


def _windowed_attention(self, query, key, value):
    """moshi's StreamingMultiheadAttention.forward for a whole sequence from frame 0 (no streaming
    state, causal, kv_repeat 1), computed over each query's window of `context` keys instead of a
    [T, T] masked matrix: the same numbers up to summation order, in O(T context) time and memory,
    so sequences of tens of thousands of frames fit in training and evaluation."""
    import torch
    import torch.nn.functional as F
    from moshi.modules.transformer import apply_weights_per_step
    if self._streaming_state is not None or self.cross_attention or not self.causal or self.kv_repeat != 1:
        raise RuntimeError("windowed attention: only the non-streaming causal self-attention (kv_repeat 1)")
    B, T = query.shape[:2]
    H, c = self.num_heads, self.context
    proj = apply_weights_per_step(self.in_projs, self.weights_per_step_schedule, query, 0)
    q, k, v = proj.view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
    if self.rope:
        q, k = self.rope(q, k, torch.zeros(B, device=q.device, dtype=torch.long), time_before_heads=False)
    kw = F.pad(k, (0, 0, c - 1, 0)).unfold(2, c, 1)  # [B, H, T, hd, c]: keys t - c + 1 .. t
    vw = F.pad(v, (0, 0, c - 1, 0)).unfold(2, c, 1)
    logits = torch.einsum("bhtd,bhtdc->bhtc", q, kw) / math.sqrt(q.shape[-1])
    valid = torch.arange(T, device=q.device).view(-1, 1) + torch.arange(c, device=q.device).view(1, -1) >= c - 1
    logits = logits.masked_fill(~valid, float("-inf"))
    x = torch.einsum("bhtc,bhtdc->bhtd", torch.softmax(logits, dim=-1), vw)
    x = x.transpose(1, 2).reshape(B, T, -1)
    return apply_weights_per_step(self.out_projs, self.weights_per_step_schedule, x, 0)


def use_windowed_attention(lm):
    """Switches every temporal layer's attention of lm to _windowed_attention (the depformer, whose
    sequences are dep_q steps long, keeps moshi's). Returns how many layers were switched."""
    import types
    n = 0
    for layer in lm.transformer.layers:
        sa = getattr(layer, "self_attn", None)
        if sa is not None and sa.context is not None:
            sa.forward = types.MethodType(_windowed_attention, sa)
            n += 1
    return n
