#pragma once
// TttKernels<Cpu>: the TTT inner loop on the host. One task per (batch item, head) runs
// that head's whole chain of mini-batches (the chain is sequential, heads are
// independent), with Eigen for the small matrix products and OpenMP over the tasks.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ttt/backend/cpu/kernels.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/backend/math.hpp"
#include "ttt/layers/ttt_kernels.hpp"

namespace ttt::layers {

namespace cpu_detail {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
using MatMap = Eigen::Map<Mat>;
using ConstMatMap = Eigen::Map<const Mat>;
using RowVecMap = Eigen::Map<RowVec>;

// Mean and 1/sqrt(biased var + eps) of one row; double sums because the fixtures are fp64
// and the row statistics are where fp32 loses the most.
inline void row_stats(const float* x, int64_t n, float eps, float& mu, float& rstd) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  const double m = s / double(n);
  double v = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = double(x[j]) - m;
    v += d * d;
  }
  mu = float(m);
  rstd = float(1.0 / std::sqrt(v / double(n) + double(eps)));
}

// out = q + LN_{γ,β}(z), row by row (the layer's o_i = q_i + LN(z̄_i)); out rows `ld` apart.
inline void residual_ln_rows(float* out, int64_t ld, const float* q, const Mat& z, const float* gamma,
                             const float* beta, float eps) {
  const int64_t n = z.rows(), f = z.cols();
  for (int64_t i = 0; i < n; ++i) {
    const float* zi = z.data() + i * f;
    float mu, rstd;
    row_stats(zi, f, eps, mu, rstd);
    for (int64_t d = 0; d < f; ++d) out[i * ld + d] = q[i * f + d] + (gamma[d] * ((zi[d] - mu) * rstd) + beta[d]);
  }
}

// g = d/dz ½‖LN_{γ,β}(z) − target‖² row by row (ttt-lm-pytorch's ln_fused_l2_bwd):
// g = (f ĝ − Σĝ − ẑ Σ(ĝ ẑ)) / (f σ), ĝ = (γ ẑ + β − target) γ.
inline void ln_l2_bwd_rows(Mat& g, const Mat& z, const Mat& target, const float* gamma, const float* beta,
                           float eps) {
  const int64_t n = z.rows(), f = z.cols();
  g.resize(n, f);
  std::vector<float> zh(static_cast<size_t>(f)), gh(static_cast<size_t>(f));
  for (int64_t i = 0; i < n; ++i) {
    const float* zi = z.data() + i * f;
    const float* ti = target.data() + i * f;
    float mu, rstd;
    row_stats(zi, f, eps, mu, rstd);
    double sg = 0, sgz = 0;
    for (int64_t d = 0; d < f; ++d) {
      const float xh = (zi[d] - mu) * rstd;
      const float gg = (gamma[d] * xh + beta[d] - ti[d]) * gamma[d];
      zh[size_t(d)] = xh;
      gh[size_t(d)] = gg;
      sg += gg;
      sgz += double(gg) * xh;
    }
    const float a = float(sg), c = float(sgz), inv = rstd / float(f);
    float* gi = g.data() + i * f;
    for (int64_t d = 0; d < f; ++d) gi[d] = (float(f) * gh[size_t(d)] - a - zh[size_t(d)] * c) * inv;
  }
}

// In place: A(i, j) <- τ_{p+i} lr_j (A(i, j) + 1) for j <= i, 0 above the diagonal. The +1
// folds the bias path (tril(η) G) into the same product as the attention path ((η⊙A) G).
inline void eta_mask(Mat& A, const float* tau_p, const float* lr) {
  const int64_t n = A.rows();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) A(i, j) = j <= i ? tau_p[i] * lr[j] * (A(i, j) + 1.f) : 0.f;
}

// gelu_tanh and the reference's gelu_bwd as Eigen array expressions: Eigen's vectorised
// tanh (|error| <= 3e-7) instead of libm's scalar tanhf, which dominated TTT-MLP.
using RowArr = Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
inline void gelu_rows(Mat& out, const Mat& in) {
  const auto x = in.array();
  out = (0.5f * x * (1.f + (0.79788456080286536f * (x + 0.044715f * x.cube())).tanh())).matrix();
}
// g <- g ⊙ gelu_bwd(z) (truncated constants, see gelu_tanh_bwd).
inline void mul_gelu_bwd(Mat& g, const Mat& z, RowArr& t) {
  const auto x = z.array();
  t = (0.79788456f * x * (1.f + 0.044715f * x.square())).tanh();
  g.array() *= 0.5f * x * ((1.f - t.square()) * (0.79788456f + 0.1070322243f * x.square())) + 0.5f * (1.f + t);
}

// Scratch of one (b, h) task, reused across its segments.
struct Scratch {
  Mat z1, a1, z2, target, g1, g2, attn, zb1, ab, zb2, carry, lg;
  RowArr tmp;
  std::vector<float> local;  // private copy of the state when it must not be written back
};

struct HeadState {
  float* W1;
  float* b1;
  float* W2;
  float* b2;
  float* S1;
  float* Sb1;
  float* S2;
  float* Sb2;
};

// Runs the whole call for one (b, h): segments cut at mini-batch boundaries.
inline void run_head(const TttInnerArgs<Cpu>& a, const TttFastWeights<Cpu>& s, int64_t b, int64_t h, Scratch& sc,
                     const TttCheckpoints<Cpu>* ck = nullptr) {
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  const int64_t nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), K = a.mini_batch_size;
  const int64_t F = s.W1.size(3);
  const int64_t bh = b * nh + h;
  const float* q = a.xq.data() + bh * L * f;
  const float* k = a.xk.data() + bh * L * f;
  const float* v = a.xv.data() + bh * L * f;
  const float* lr = a.lr.data() + bh * L;
  const float* tau = a.tau.data();
  const float* gamma = a.ln_weight.data() + h * f;
  const float* beta = a.ln_bias.data() + h * f;
  float* out = a.out.data() + b * a.out.stride(0) + h * a.out.stride(1);
  const int64_t ld_out = a.out.stride(2);

  const int64_t n_w1 = f * F, n_w2 = mlp ? F * f : 0, n_b2 = mlp ? f : 0;
  HeadState st{s.W1.data() + bh * n_w1,
               s.b1.data() + bh * F,
               mlp ? s.W2.data() + bh * n_w2 : nullptr,
               mlp ? s.b2.data() + bh * n_b2 : nullptr,
               s.W1_grad.data() + bh * n_w1,
               s.b1_grad.data() + bh * F,
               mlp ? s.W2_grad.data() + bh * n_w2 : nullptr,
               mlp ? s.b2_grad.data() + bh * n_b2 : nullptr};
  const bool commit = !a.commit.defined() || a.commit.data()[b];
  if (!commit) {
    // Work on a private copy: the outputs are those of a normal call, the state stays.
    const size_t per = size_t(2 * (n_w1 + F + n_w2 + n_b2));
    sc.local.resize(per);
    float* p = sc.local.data();
    auto take = [&](float*& ptr, int64_t n) {
      if (!ptr) return;
      std::memcpy(p, ptr, size_t(n) * sizeof(float));
      ptr = p;
      p += n;
    };
    take(st.W1, n_w1), take(st.b1, F), take(st.W2, n_w2), take(st.b2, n_b2);
    take(st.S1, n_w1), take(st.Sb1, F), take(st.S2, n_w2), take(st.Sb2, n_b2);
  }
  MatMap W1(st.W1, f, F), S1(st.S1, f, F);
  RowVecMap b1(st.b1, F), Sb1(st.Sb1, F);
  MatMap W2(st.W2, mlp ? F : 0, mlp ? f : 0), S2(st.S2, mlp ? F : 0, mlp ? f : 0);
  RowVecMap b2(st.b2, mlp ? f : 0), Sb2(st.Sb2, mlp ? f : 0);

  int64_t p = ((int64_t(a.phase.data()[b]) % K) + K) % K;
  for (int64_t t = 0, m = 0; t < L;) {
    const int64_t n = std::min(L - t, K - p);
    if (ck && p == 0 && m++ % ck->every == 0) {  // the state before this mini-batch, as a checkpoint
      const int64_t row = ((m - 1) / ck->every * a.xq.size(0) + b) * nh + h;
      std::copy(st.W1, st.W1 + n_w1, ck->W1.data() + row * n_w1);
      std::copy(st.b1, st.b1 + F, ck->b1.data() + row * F);
      if (mlp) {
        std::copy(st.W2, st.W2 + n_w2, ck->W2.data() + row * n_w2);
        std::copy(st.b2, st.b2 + n_b2, ck->b2.data() + row * n_b2);
      }
    }
    ConstMatMap Q(q + t * f, n, f), Kx(k + t * f, n, f), V(v + t * f, n, f);
    const float* lr_t = lr + t;
    const float* tau_p = tau + p;
    // Gradients of the self-supervised loss at the mini-batch-start weights.
    sc.target.noalias() = V - Kx;
    sc.z1.noalias() = Kx * W1;
    sc.z1.rowwise() += b1;
    Mat* last_g;   // gradient of the layer whose output feeds the LN (G for linear, G2 for mlp)
    if (mlp) {
      gelu_rows(sc.a1, sc.z1);
      sc.z2.noalias() = sc.a1 * W2;
      sc.z2.rowwise() += b2;
      ln_l2_bwd_rows(sc.g2, sc.z2, sc.target, gamma, beta, a.eps);
      sc.g1.noalias() = sc.g2 * W2.transpose();
      mul_gelu_bwd(sc.g1, sc.z1, sc.tmp);
      last_g = &sc.g2;
    } else {
      ln_l2_bwd_rows(sc.g1, sc.z1, sc.target, gamma, beta, a.eps);
      last_g = &sc.g1;
    }
    // First (or only) layer on the queries.
    sc.attn.noalias() = Q * Kx.transpose();
    eta_mask(sc.attn, tau_p, lr_t);
    sc.zb1.noalias() = Q * W1;
    sc.zb1.rowwise() += b1;
    sc.zb1.noalias() -= sc.attn * sc.g1;
    if (p > 0) {
      sc.carry.noalias() = Q * S1;
      sc.carry.rowwise() += Sb1;
      for (int64_t i = 0; i < n; ++i) sc.zb1.row(i) -= tau_p[i] * sc.carry.row(i);
    }
    const Mat* zout = &sc.zb1;
    if (mlp) {
      gelu_rows(sc.ab, sc.zb1);
      // Attn2 pairs the query-path activations with the key-path ones (ttt_reference c).
      sc.attn.noalias() = sc.ab * sc.a1.transpose();
      eta_mask(sc.attn, tau_p, lr_t);
      sc.zb2.noalias() = sc.ab * W2;
      sc.zb2.rowwise() += b2;
      sc.zb2.noalias() -= sc.attn * sc.g2;
      if (p > 0) {
        sc.carry.noalias() = sc.ab * S2;
        sc.carry.rowwise() += Sb2;
        for (int64_t i = 0; i < n; ++i) sc.zb2.row(i) -= tau_p[i] * sc.carry.row(i);
      }
      zout = &sc.zb2;
    }
    residual_ln_rows(out + t * ld_out, ld_out, q + t * f, *zout, gamma, beta, a.eps);
    // Running sums (not scaled by τ: the reference's W1_grad / b1_grad).
    sc.lg = sc.g1;
    for (int64_t i = 0; i < n; ++i) sc.lg.row(i) *= lr_t[i];
    S1.noalias() += Kx.transpose() * sc.lg;
    Sb1 += sc.lg.colwise().sum();
    if (mlp) {
      sc.lg = *last_g;
      for (int64_t i = 0; i < n; ++i) sc.lg.row(i) *= lr_t[i];
      S2.noalias() += sc.a1.transpose() * sc.lg;
      Sb2 += sc.lg.colwise().sum();
    }
    t += n;
    p += n;
    if (p == K) {
      // The mini-batch is complete: its last row of η moves the weights (commit).
      const float tl = tau[K - 1];
      W1 -= tl * S1;
      b1 -= tl * Sb1;
      S1.setZero();
      Sb1.setZero();
      if (mlp) {
        W2 -= tl * S2;
        b2 -= tl * Sb2;
        S2.setZero();
        Sb2.setZero();
      }
      p = 0;
    }
  }
}

// inner / inner_checkpointed: run_head for every (b, h), in parallel when worth it.
inline void run_heads(const TttInnerArgs<Cpu>& a, const TttFastWeights<Cpu>& s, const TttCheckpoints<Cpu>* ck) {
  TTT_CHECK(a.phase.defined() && a.phase.numel() == a.xq.size(0) && a.phase.is_contiguous() &&
                (!a.commit.defined() || (a.commit.numel() == a.xq.size(0) && a.commit.is_contiguous())),
            "TttKernels<Cpu>::inner: phase / commit must be contiguous [", a.xq.size(0), "]");
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3);
  const int64_t F = s.W1.size(3);
  const int64_t tasks = Bn * nh;
  const int64_t work = tasks * L * f * F;
  // Threads only for work worth a fork/join (~1 ms): on a busy machine a parallel region
  // can wait tens of ms for a core, which would dominate a decode step.
  [[maybe_unused]] const int nt = work >= (int64_t(1) << 20) ? int(std::min<int64_t>(cpu::num_threads(), tasks)) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) run_head(a, s, i / nh, i % nh, sc, ck);
  }
}

}  // namespace cpu_detail

template <>
struct TttKernels<Cpu> {
  // The inner loop over a call for every (b, h); see ttt_kernels.hpp for the contract.
  static void inner(const TttInnerArgs<Cpu>& a, const TttFastWeights<Cpu>& s) { cpu_detail::run_heads(a, s, nullptr); }

  // inner() writing checkpoints on the way (TttCheckpoints); true: done (the host always can).
  static bool inner_checkpointed(const TttInnerArgs<Cpu>& a, const TttFastWeights<Cpu>& s,
                                 const TttCheckpoints<Cpu>& ck) {
    const int64_t Bn = a.xq.size(0), L = a.xq.size(2), K = a.mini_batch_size;
    TTT_CHECK(ck.every >= 1, "TttKernels<Cpu>::inner_checkpointed: every must be >= 1, got ", ck.every);
    TTT_CHECK(a.phase.defined() && a.phase.numel() == Bn && a.phase.is_contiguous(),
              "TttKernels<Cpu>::inner_checkpointed: phase must be contiguous [", Bn, "]");
    for (int64_t b = 0; b < Bn; ++b)
      TTT_CHECK(a.phase.data()[b] == 0, "TttKernels<Cpu>::inner_checkpointed: item ", b, " starts at phase ",
                a.phase.data()[b], ", checkpoints need phase 0");
    const int64_t Mc = ttt_num_checkpoints(L, K, ck.every);
    auto need = [&](const Tensor<float, Cpu>& c, const Tensor<float, Cpu>& w, const char* name) {
      Shape want = w.shape();
      want.d[0] = Mc * Bn;
      TTT_CHECK(c.shape() == want && c.is_contiguous() && w.is_contiguous(), "TttKernels<Cpu>::inner_checkpointed: ",
                name, " must be contiguous ", want.str(), ", got ", c.shape().str());
    };
    need(ck.W1, s.W1, "W1"), need(ck.b1, s.b1, "b1");
    if (a.kind == TttConfig::Kind::mlp) need(ck.W2, s.W2, "W2"), need(ck.b2, s.b2, "b2");
    cpu_detail::run_heads(a, s, &ck);
    return true;
  }

  // Causal depthwise convs of share_qk on xqk [B, L, C] with history [B, C, kc] (the last kc
  // inputs before this call, oldest first, zeros at the stream start): out[t, c] =
  // bias[c] + Σ_m w[c, m] x[t - kc + 1 + m, c]. The history of items with commit = 1 moves on.
  static void causal_conv(const Tensor<float, Cpu>& out_q, const Tensor<float, Cpu>& out_k,
                          const Tensor<float, Cpu>& x, const Tensor<float, Cpu>& history,
                          const Tensor<float, Cpu>& wq, const Tensor<float, Cpu>& bq, const Tensor<float, Cpu>& wk,
                          const Tensor<float, Cpu>& bk, const Tensor<uint8_t, Cpu>& commit) {
    const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), kc = history.size(2);
    std::vector<float> win(static_cast<size_t>(kc - 1 + L));
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t c = 0; c < C; ++c) {
        float* hist = history.data() + (b * C + c) * kc;
        // win = [x[-kc+1], ..., x[-1], x[0], ..., x[L-1]]
        for (int64_t j = 0; j < kc - 1; ++j) win[size_t(j)] = hist[j + 1];
        for (int64_t t = 0; t < L; ++t) win[size_t(kc - 1 + t)] = x.data()[(b * L + t) * C + c];
        const float* pwq = wq.data() + c * kc;
        const float* pwk = wk.data() + c * kc;
        for (int64_t t = 0; t < L; ++t) {
          float aq = bq.data()[c], ak = bk.data()[c];
          for (int64_t m = 0; m < kc; ++m) {
            const float xv = win[size_t(t + m)];
            aq += pwq[m] * xv;
            ak += pwk[m] * xv;
          }
          out_q.data()[(b * L + t) * C + c] = aq;
          out_k.data()[(b * L + t) * C + c] = ak;
        }
        if (!commit.defined() || commit.data()[b]) {
          // The last kc inputs of [hist[0], win...]: hist[0] is x[-kc], only needed when L == 0.
          const int64_t total = kc + L;  // conceptual sequence hist[0..kc-1], x[0..L-1]
          std::vector<float> seq(static_cast<size_t>(kc));
          for (int64_t j = 0; j < kc; ++j) {
            const int64_t idx = total - kc + j;  // index into [hist, x]
            seq[size_t(j)] = idx < kc ? hist[idx] : x.data()[(b * L + (idx - kc)) * C + c];
          }
          std::copy(seq.begin(), seq.end(), hist);
        }
      }
  }

  // A call's step-dependent values from the positions of its tokens, on the backend so that
  // no host value changes from step to step (CUDA graphs): out_pos = (positions + add) mod
  // `mod` (plain + add when mod = 0), phase[b] = out_pos[b, 0] (when defined), commit[b] =
  // exec[b] != 0 (1 without an exec mask; when defined). positions [B, L] int64.
  static void call_flags(const Tensor<int64_t, Cpu>& positions, const Tensor<uint8_t, Cpu>& exec, int64_t add,
                         int64_t mod, const Tensor<int64_t, Cpu>& out_pos, const Tensor<int32_t, Cpu>& phase,
                         const Tensor<uint8_t, Cpu>& commit) {
    const int64_t Bn = positions.size(0), L = positions.size(1);
    for (int64_t b = 0; b < Bn; ++b) {
      for (int64_t t = 0; t < L; ++t) {
        int64_t v = positions(b, t) + add;
        if (mod > 0) v = ((v % mod) + mod) % mod;
        out_pos(b, t) = v;
      }
      if (phase.defined()) phase.data()[b] = L > 0 ? int32_t(out_pos(b, 0)) : 0;
      if (commit.defined()) commit.data()[b] = exec.defined() ? uint8_t(exec.data()[b] != 0) : uint8_t(1);
    }
  }

  // See TttPrologue (ttt_kernels.hpp): on the host, the separate steps it stands for (the
  // backends' fused kernels must give these numbers).
  template <class T>
  static void prologue(const TttPrologue<T, Cpu>& a) {
    const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), C = nh * f;
    TTT_CHECK(a.proj.rank() == 3 && a.proj.size(0) == Bn && a.proj.size(1) == L && a.proj.size(2) >= 3 * C + nh &&
                  a.proj.stride(2) == 1,
              "TttKernels<Cpu>::prologue: proj ", a.proj.shape().str(), " for ", nh, " heads of ", f);
    for (const Tensor<float, Cpu>* t : {&a.xq, &a.xk, &a.xv, &a.lr})
      TTT_CHECK(t->is_contiguous(), "TttKernels<Cpu>::prologue: outputs must be contiguous");
    auto heads = [&](int64_t col) {  // columns [col, col + C) as float [B, L, nh, f]
      auto t = Tensor<float, Cpu>::empty({Bn, L, nh, f});
      ops::cast(t.reshape({Bn, L, C}), a.proj.slice(2, col, col + C));
      return t;
    };
    const auto q = heads(0), k = heads(C), v = heads(2 * C);
    auto positions = Tensor<int64_t, Cpu>::empty({Bn, L});  // mod K; and the flags
    call_flags(a.positions, a.exec, 0, a.mini_batch_size, positions, a.phase, a.commit);
    if (a.l2_norm_qk) {
      l2_normalize(q);
      l2_normalize(k);
    }
    ops::rope(q, q, positions, a.rope_theta);
    ops::rope(k, k, positions, a.rope_theta);
    if (a.ln_target) ln_target(v, k, a.ln_weight, a.ln_bias, a.ln_eps);
    auto lr = Tensor<float, Cpu>::empty({Bn, L, nh});
    ops::cast(lr, a.proj.slice(2, 3 * C, 3 * C + nh));
    ops::add_(lr, a.lr_bias);
    ops::unary(lr, lr, Unary::sigmoid);
    ops::unary(lr, lr, Unary::scale, a.lr_scale);
    a.xq.copy_from(q.transpose(1, 2));
    a.xk.copy_from(k.transpose(1, 2));
    a.xv.copy_from(v.transpose(1, 2));
    a.lr.copy_from(lr.transpose(1, 2));
  }

  // The host runs a step as its three parts.
  template <class T>
  static bool step(const TttStep<T, Cpu>&, const TttFastWeights<Cpu>&) {
    return false;
  }

  // out[b, t, :] = LayerNorm(in[b, t, :]) * weight + bias over the last dimension C, cast to
  // T (the layer's post_norm; `in` is the inner loop's token-major output).
  template <class T>
  static void post_norm(const Tensor<T, Cpu>& out, const Tensor<float, Cpu>& in, const Tensor<float, Cpu>& weight,
                        const Tensor<float, Cpu>& bias, float eps) {
    TTT_CHECK(out.shape() == in.shape(), "TttKernels<Cpu>::post_norm: ", in.shape().str(), " into ",
              out.shape().str());
    ops::cast(out, ops::layer_norm(in, weight, bias, eps));
  }

  // x / max(‖x‖₂, 1e-12) over the last dimension, in place (torch F.normalize).
  static void l2_normalize(const Tensor<float, Cpu>& x) {
    const int64_t rows = cpu::num_rows(x.shape()), n = x.size(-1);
    for (int64_t r = 0; r < rows; ++r) {
      float* p = x.data() + cpu::row_offset(x.shape(), x.strides(), r);
      double ss = 0;
      for (int64_t j = 0; j < n; ++j) ss += double(p[j]) * p[j];
      const float inv = float(1.0 / std::max(std::sqrt(ss), 1e-12));
      for (int64_t j = 0; j < n; ++j) p[j] *= inv;
    }
  }

  // ttt-video-dit's ln_reconstruction_target on [B, L, nh, f], in place on xv:
  // xv <- xk + γ_h ⊙ (d − mean(d)) / (std_unbiased(d) + eps) + β_h, d = xv − xk.
  static void ln_target(const Tensor<float, Cpu>& xv, const Tensor<float, Cpu>& xk, const Tensor<float, Cpu>& weight,
                        const Tensor<float, Cpu>& bias, float eps) {
    const int64_t Bn = xv.size(0), L = xv.size(1), nh = xv.size(2), f = xv.size(3);
    std::vector<double> d(static_cast<size_t>(f));
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < L; ++t)
        for (int64_t h = 0; h < nh; ++h) {
          float* pv = xv.data() + ((b * L + t) * nh + h) * f;
          const float* pk = xk.data() + ((b * L + t) * nh + h) * f;
          double m = 0;
          for (int64_t j = 0; j < f; ++j) m += (d[size_t(j)] = double(pv[j]) - pk[j]);
          m /= double(f);
          double var = 0;
          for (int64_t j = 0; j < f; ++j) var += (d[size_t(j)] - m) * (d[size_t(j)] - m);
          const double sd = std::sqrt(var / double(f > 1 ? f - 1 : 1));
          const float inv = float(1.0 / (sd + double(eps)));
          for (int64_t j = 0; j < f; ++j)
            pv[j] = pk[j] + (weight.data()[h * f + j] * (float(d[size_t(j)] - m) * inv) + bias.data()[h * f + j]);
        }
  }
};

}  // namespace ttt::layers
