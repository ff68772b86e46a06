#pragma once
// TttBackwardKernels<Cpu>: the backward of the TTT inner loop on the host (the contract is in
// ttt_backward_kernels.hpp). One task per (batch item, head) walks that head's mini-batches
// in reverse, recomputing each one's forward from its start state (rebuilt from the nearest
// checkpoint) and carrying the gradient of the fast weights backwards; OpenMP over the tasks.
//
// The per-head code is templated on the scalar S: the kernel runs it in float, the tests run
// it in double (with the forward below) against finite differences.
//
// Notation per mini-batch (n rows, η_ij = τ_i lr_j, rows i of Q, K, V; F the inner width):
//   key path    Z1 = K W1 + b1                          (linear: Zk = Z1)
//               A1 = gelu(Z1), Z2 = A1 W2 + b2          (mlp:    Zk = Z2)
//               x̂ = LN-normalised Zk (rstd = 1/σ), ĝ = (γ x̂ + β - T) ⊙ γ, T = V - K
//               G = rstd (ĝ - mean ĝ - x̂ mean(ĝ x̂))     (= G1 linear, G2 mlp)
//               mlp: P = G2 W2ᵀ, H = gelu_bwd(Z1) (ttt-lm-pytorch's truncated constants), G1 = P ⊙ H
//   query path  S1 = Q Kᵀ, E1 = tril(η ⊙ (S1 + 1)), Z̄1 = Q W1 + b1 - E1 G1
//               mlp: Ā = gelu(Z̄1), S2 = Ā A1ᵀ, E2 = tril(η ⊙ (S2 + 1)), Z̄2 = Ā W2 + b2 - E2 G2
//               out = Q + γ x̄ + β, x̄ = LN-normalised Z̄ (Z̄1 linear, Z̄2 mlp)
//   update      W1' = W1 - τ_{K-1} Kᵀ diag(lr) G1, b1' = b1 - τ_{K-1} lrᵀ G1 (mlp: W2, b2 with A1, G2)
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ttt/backend/cpu/kernels.hpp"
#include "ttt/layers/ttt_backward_kernels.hpp"

namespace ttt::layers {

namespace cpu_grad {

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using Row = Eigen::Matrix<S, 1, Eigen::Dynamic>;
template <class S>
using Col = Eigen::Matrix<S, Eigen::Dynamic, 1>;
template <class S>
using ConstMap = Eigen::Map<const Mat<S>>;

// One (b, h) task's inputs: rows of L tokens, f wide, contiguous.
template <class S>
struct HeadInputs {
  bool mlp = false;
  int64_t L = 0, f = 0, F = 0, K = 0;
  S eps = S(1e-6);
  const S* q = nullptr;      // [L, f] after RoPE
  const S* k = nullptr;      // [L, f]
  const S* v = nullptr;      // [L, f]
  const S* lr = nullptr;     // [L]
  const S* tau = nullptr;    // [K]
  const S* gamma = nullptr;  // [f]
  const S* beta = nullptr;   // [f]
};

// The fast weights of one head (or their gradients).
template <class S>
struct HeadWeights {
  Mat<S> W1, W2;  // [f, F], [F, f] (mlp)
  Row<S> b1, b2;  // [F], [f] (mlp)
  void zero(int64_t f, int64_t F, bool mlp) {
    W1.setZero(f, F);
    b1.setZero(F);
    if (mlp) {
      W2.setZero(F, f);
      b2.setZero(f);
    }
  }
};

// Gradients of one head's inputs.
template <class S>
struct HeadGrads {
  Mat<S> dq, dk, dv;       // [L, f]
  Col<S> dlr;              // [L]
  Col<S> dtau;             // [K]
  Row<S> dgamma, dbeta;    // [f]
  HeadWeights<S> dw;       // d / d(the initial fast weights)
};

// Row statistics of LN: x̂ = (z - μ) rstd, rstd = 1 / sqrt(var_biased + eps); sums in double.
template <class S>
void ln_rows(const Mat<S>& z, S eps, Mat<S>& xh, Col<S>& rstd) {
  const int64_t n = z.rows(), w = z.cols();
  xh.resize(n, w);
  rstd.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t j = 0; j < w; ++j) s += double(z(i, j));
    const double mu = s / double(w);
    double v = 0;
    for (int64_t j = 0; j < w; ++j) v += (double(z(i, j)) - mu) * (double(z(i, j)) - mu);
    const S r = S(1.0 / std::sqrt(v / double(w) + double(eps)));
    rstd(i) = r;
    for (int64_t j = 0; j < w; ++j) xh(i, j) = (z(i, j) - S(mu)) * r;
  }
}

// d/dx of ½‖LN(x) - t‖²'s row-wise partner: g = rstd (u - mean u - x̂ mean(u x̂)) (u given).
template <class S>
void ln_project(Mat<S>& g, const Mat<S>& u, const Mat<S>& xh, const Col<S>& rstd) {
  const int64_t n = u.rows(), w = u.cols();
  g.resize(n, w);
  for (int64_t i = 0; i < n; ++i) {
    double su = 0, sux = 0;
    for (int64_t j = 0; j < w; ++j) {
      su += double(u(i, j));
      sux += double(u(i, j)) * double(xh(i, j));
    }
    const S mu = S(su / double(w)), mux = S(sux / double(w));
    for (int64_t j = 0; j < w; ++j) g(i, j) = rstd(i) * (u(i, j) - mu - xh(i, j) * mux);
  }
}

// gelu_tanh, its exact derivative (what autograd gives for F.gelu(approximate="tanh")), the
// reference's gelu_bwd with truncated constants (ttt_reference b.9) and that formula's own
// exact derivative (autograd differentiates through gelu_bwd inside the forward).
template <class S>
S gelu(S x) {
  return S(0.5) * x * (S(1) + std::tanh(S(0.79788456080286536) * (x + S(0.044715) * x * x * x)));
}
template <class S>
S gelu_grad(S x) {
  const S k = S(0.79788456080286536);
  const S t = std::tanh(k * (x + S(0.044715) * x * x * x));
  return S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t * t) * k * (S(1) + S(3 * 0.044715) * x * x);
}
template <class S>
S gelu_bwd_trunc(S x) {
  const S t = std::tanh(S(0.79788456) * x * (S(1) + S(0.044715) * x * x));
  return S(0.5) * x * ((S(1) - t * t) * (S(0.79788456) + S(0.1070322243) * x * x)) + S(0.5) * (S(1) + t);
}
template <class S>
S gelu_bwd_trunc_grad(S x) {
  const S c1 = S(0.79788456), a = S(0.044715), c3 = S(0.1070322243);
  const S t = std::tanh(c1 * x * (S(1) + a * x * x));
  const S s = S(1) - t * t;
  const S dt = s * (c1 + S(3) * c1 * a * x * x);  // d tanh(u) / dx
  const S w = c1 + c3 * x * x;
  return S(0.5) * s * w - x * t * dt * w + c3 * x * x * s + S(0.5) * dt;
}
template <class S, class Fn>
Mat<S> map(const Mat<S>& x, Fn fn) {
  Mat<S> y(x.rows(), x.cols());
  for (int64_t i = 0; i < x.size(); ++i) y.data()[i] = fn(x.data()[i]);
  return y;
}

// E = tril(η ⊙ (S + 1)), η_ij = τ_i lr_j.
template <class S>
void eta_matrix(Mat<S>& E, const Mat<S>& Sm, const S* tau, const S* lr) {
  const int64_t n = Sm.rows();
  E.resize(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) E(i, j) = j <= i ? tau[i] * lr[j] * (Sm(i, j) + S(1)) : S(0);
}

// Backward of Z̄ -= E G, E = tril(η ⊙ (X Yᵀ + 1)), given dZ̄: dG -= Eᵀ dZ̄, and through
// dE = -dZ̄ Gᵀ (lower triangle): dX += dS Y, dY += dSᵀ X with dS = dE ⊙ η, dτ_i += Σ_j dE_ij lr_j (S_ij + 1),
// dlr_j += Σ_i dE_ij τ_i (S_ij + 1).
template <class S>
void eta_backward(const Mat<S>& dZb, const Mat<S>& G, const Mat<S>& Sm, const Mat<S>& E, const Mat<S>& X,
                  const Mat<S>& Y, const S* tau, const S* lr, Mat<S>& dG, Mat<S>& dX, Mat<S>& dY, S* dtau, S* dlr) {
  const int64_t n = Sm.rows();
  dG.noalias() -= E.transpose() * dZb;
  Mat<S> dE = -(dZb * G.transpose());
  Mat<S> dS = Mat<S>::Zero(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const S e = dE(i, j), a = Sm(i, j) + S(1);
      dtau[i] += e * lr[j] * a;
      dlr[j] += e * tau[i] * a;
      dS(i, j) = e * tau[i] * lr[j];
    }
  dX.noalias() += dS * Y;
  dY.noalias() += dS.transpose() * X;
}

// Backward of W' = W - τl Xᵀ diag(lr) G, b' = b - τl lrᵀ G given dW', db' (the caller adds
// dW' and db' to the gradient of W and b): dX, dG, dlr and dτl.
template <class S>
void update_backward(const Mat<S>& dWn, const Row<S>& dbn, const Mat<S>& X, const Mat<S>& G, const S* lr, S tl,
                     Mat<S>& dX, Mat<S>& dG, S* dlr, S& dtl) {
  const int64_t n = X.rows();
  Mat<S> LG = G;
  for (int64_t i = 0; i < n; ++i) LG.row(i) *= lr[i];
  dtl -= (dWn.cwiseProduct(X.transpose() * LG)).sum() + dbn.dot(LG.colwise().sum());
  const Mat<S> dSW = -tl * dWn;
  const Row<S> dSb = -tl * dbn;
  dX.noalias() += LG * dSW.transpose();
  Mat<S> R = X * dSW;
  R.rowwise() += dSb;
  for (int64_t i = 0; i < n; ++i) {
    dlr[i] += R.row(i).dot(G.row(i));
    dG.row(i) += lr[i] * R.row(i);
  }
}

// Backward of G = rstd (ĝ - mean ĝ - x̂ mean(ĝ x̂)), ĝ = (γ x̂ + β - T) ⊙ γ, x̂ = LN(Z), given
// dG: dZ, dT (overwritten), dγ, dβ (accumulated). Per row, with c = mean(ĝ x̂):
//   dĝ = rstd (dG - mean dG - x̂ mean(dG x̂))
//   dx̂ = -rstd c dG - rstd mean(dG x̂) ĝ + γ² dĝ,   dσ = -rstd Σ dG G   (G's explicit 1/σ)
//   dγ += dĝ (2 γ x̂ + β - T),  dβ += dĝ γ,  dT = -dĝ γ
//   dZ = rstd (dx̂ - mean dx̂ - x̂ mean(dx̂ x̂)) + dσ x̂ / w
template <class S>
void ln_l2_backward(const Mat<S>& dG, const Mat<S>& G, const Mat<S>& xh, const Col<S>& rstd, const Mat<S>& gh,
                    const Mat<S>& T, const S* gamma, const S* beta, Mat<S>& dZ, Mat<S>& dT, Row<S>& dgamma,
                    Row<S>& dbeta) {
  const int64_t n = dG.rows(), w = dG.cols();
  Mat<S> dgh;
  ln_project(dgh, dG, xh, rstd);
  Mat<S> dxh(n, w);
  dT.resize(n, w);
  Col<S> dsig(n);
  for (int64_t i = 0; i < n; ++i) {
    double c = 0, mdgx = 0, sgg = 0;
    for (int64_t j = 0; j < w; ++j) {
      c += double(gh(i, j)) * double(xh(i, j));
      mdgx += double(dG(i, j)) * double(xh(i, j));
      sgg += double(dG(i, j)) * double(G(i, j));
    }
    const S cs = S(c / double(w)), ms = S(mdgx / double(w)), r = rstd(i);
    dsig(i) = -r * S(sgg);
    for (int64_t j = 0; j < w; ++j) {
      const S g = gamma[j], x = xh(i, j), d = dgh(i, j);
      dxh(i, j) = -r * cs * dG(i, j) - r * ms * gh(i, j) + g * g * d;
      dgamma(j) += d * (S(2) * g * x + beta[j] - T(i, j));
      dbeta(j) += d * g;
      dT(i, j) = -d * g;
    }
  }
  ln_project(dZ, dxh, xh, rstd);
  for (int64_t i = 0; i < n; ++i) dZ.row(i) += (dsig(i) / S(w)) * xh.row(i);
}

// One mini-batch: its forward from a start state, every intermediate kept for its backward.
template <class S>
struct MiniBatch {
  int64_t t0 = 0, n = 0;
  Mat<S> Q, Kx, V, T;
  Mat<S> Z1, A1, Z2, xh, gh, G1, G2, P, H;  // key path
  Col<S> rstd;
  Mat<S> S1, E1, Zb1, Ab, S2, E2, Zb2, xb;  // query path
  Col<S> rstdb;

  // The key path: gradients at the start state (all the update needs).
  void keys(const HeadInputs<S>& in, const HeadWeights<S>& w, int64_t t0_, int64_t n_) {
    t0 = t0_, n = n_;
    const int64_t f = in.f;
    Q = ConstMap<S>(in.q + t0 * f, n, f);
    Kx = ConstMap<S>(in.k + t0 * f, n, f);
    V = ConstMap<S>(in.v + t0 * f, n, f);
    T = V - Kx;
    Z1.noalias() = Kx * w.W1;
    Z1.rowwise() += w.b1;
    const Mat<S>& Zk = in.mlp ? Z2 : Z1;
    if (in.mlp) {
      A1 = map(Z1, gelu<S>);
      Z2.noalias() = A1 * w.W2;
      Z2.rowwise() += w.b2;
    }
    ln_rows(Zk, in.eps, xh, rstd);
    gh.resize(n, f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < f; ++j) gh(i, j) = (in.gamma[j] * xh(i, j) + in.beta[j] - T(i, j)) * in.gamma[j];
    Mat<S>& G = in.mlp ? G2 : G1;
    ln_project(G, gh, xh, rstd);
    if (in.mlp) {
      P.noalias() = G2 * w.W2.transpose();
      H = map(Z1, gelu_bwd_trunc<S>);
      G1 = P.cwiseProduct(H);
    }
  }

  // The query path; writes out = Q + LN(Z̄) when `out` is given (rows `ld` apart).
  void queries(const HeadInputs<S>& in, const HeadWeights<S>& w, S* out = nullptr, int64_t ld = 0) {
    const S* tau = in.tau;
    const S* lr = in.lr + t0;
    S1.noalias() = Q * Kx.transpose();
    eta_matrix(E1, S1, tau, lr);
    Zb1.noalias() = Q * w.W1;
    Zb1.rowwise() += w.b1;
    Zb1.noalias() -= E1 * G1;
    if (in.mlp) {
      Ab = map(Zb1, gelu<S>);
      S2.noalias() = Ab * A1.transpose();
      eta_matrix(E2, S2, tau, lr);
      Zb2.noalias() = Ab * w.W2;
      Zb2.rowwise() += w.b2;
      Zb2.noalias() -= E2 * G2;
    }
    ln_rows(in.mlp ? Zb2 : Zb1, in.eps, xb, rstdb);
    if (out)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < in.f; ++j)
          out[i * ld + j] = Q(i, j) + in.gamma[j] * xb(i, j) + in.beta[j];
  }

  // The end-of-mini-batch update (full mini-batches only).
  void update(const HeadInputs<S>& in, HeadWeights<S>& w) const {
    const S tl = in.tau[in.K - 1];
    const S* lr = in.lr + t0;
    auto step = [&](Mat<S>& W, Row<S>& b, const Mat<S>& X, const Mat<S>& G) {
      Mat<S> LG = G;
      for (int64_t i = 0; i < n; ++i) LG.row(i) *= lr[i];
      W.noalias() -= tl * (X.transpose() * LG);
      b -= tl * LG.colwise().sum();
    };
    step(w.W1, w.b1, Kx, G1);
    if (in.mlp) step(w.W2, w.b2, A1, G2);
  }

  // Backward of this mini-batch from its start state w: dout [n, f] (rows `ld` apart) and the
  // carry d (the gradient of the state after it; used for full mini-batches) in; d becomes the
  // gradient of the start state. Row gradients go to g at rows t0.., dτ/dγ/dβ accumulate.
  void backward(const HeadInputs<S>& in, const HeadWeights<S>& w, const S* dout, int64_t ld, bool full,
                HeadWeights<S>& d, HeadGrads<S>& g) const {
    const int64_t f = in.f, F = in.F;
    const S* tau = in.tau;
    const S* lr = in.lr + t0;
    S* dlr = g.dlr.data() + t0;
    S* dtau = g.dtau.data();
    Mat<S> dO(n, f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < f; ++j) dO(i, j) = dout[i * ld + j];
    // out = Q + γ x̄ + β
    Mat<S> dQ = dO, dK = Mat<S>::Zero(n, f);
    g.dgamma += dO.cwiseProduct(xb).colwise().sum();
    g.dbeta += dO.colwise().sum();
    Mat<S> u = dO;
    for (int64_t i = 0; i < n; ++i) u.row(i) = u.row(i).cwiseProduct(ConstMap<S>(in.gamma, 1, f));
    Mat<S> dZq;
    ln_project(dZq, u, xb, rstdb);
    // The gradient of the state after this mini-batch is the start state's too (W' = W - ...).
    HeadWeights<S> nw;
    if (full) nw = d;
    else nw.zero(f, F, in.mlp);
    Mat<S> dG1 = Mat<S>::Zero(n, F), dG2, dA1, dZb1;
    if (in.mlp) {
      // Z̄2 = Ā W2 + b2 - E2 G2
      nw.W2.noalias() += Ab.transpose() * dZq;
      nw.b2 += dZq.colwise().sum();
      Mat<S> dAb = dZq * w.W2.transpose();
      dG2 = Mat<S>::Zero(n, f);
      dA1 = Mat<S>::Zero(n, F);
      eta_backward(dZq, G2, S2, E2, Ab, A1, tau, lr, dG2, dAb, dA1, dtau, dlr);
      dZb1 = dAb.cwiseProduct(map(Zb1, gelu_grad<S>));
    } else {
      dZb1 = dZq;
    }
    // Z̄1 = Q W1 + b1 - E1 G1
    nw.W1.noalias() += Q.transpose() * dZb1;
    nw.b1 += dZb1.colwise().sum();
    dQ.noalias() += dZb1 * w.W1.transpose();
    eta_backward(dZb1, G1, S1, E1, Q, Kx, tau, lr, dG1, dQ, dK, dtau, dlr);
    // The update, through the carry.
    if (full) {
      update_backward(d.W1, d.b1, Kx, G1, lr, tau[in.K - 1], dK, dG1, dlr, dtau[in.K - 1]);
      if (in.mlp) update_backward(d.W2, d.b2, A1, G2, lr, tau[in.K - 1], dA1, dG2, dlr, dtau[in.K - 1]);
    }
    // The key path.
    Mat<S> dZ1, dT;
    if (in.mlp) {
      // G1 = P ⊙ H, P = G2 W2ᵀ, H = gelu_bwd(Z1)
      const Mat<S> dP = dG1.cwiseProduct(H);
      dZ1 = dG1.cwiseProduct(P).cwiseProduct(map(Z1, gelu_bwd_trunc_grad<S>));
      dG2.noalias() += dP * w.W2;
      nw.W2.noalias() += dP.transpose() * G2;
      Mat<S> dZ2;
      ln_l2_backward(dG2, G2, xh, rstd, gh, T, in.gamma, in.beta, dZ2, dT, g.dgamma, g.dbeta);
      // Z2 = A1 W2 + b2, A1 = gelu(Z1)
      dA1.noalias() += dZ2 * w.W2.transpose();
      nw.W2.noalias() += A1.transpose() * dZ2;
      nw.b2 += dZ2.colwise().sum();
      dZ1 += dA1.cwiseProduct(map(Z1, gelu_grad<S>));
    } else {
      ln_l2_backward(dG1, G1, xh, rstd, gh, T, in.gamma, in.beta, dZ1, dT, g.dgamma, g.dbeta);
    }
    // Z1 = K W1 + b1, T = V - K
    nw.W1.noalias() += Kx.transpose() * dZ1;
    nw.b1 += dZ1.colwise().sum();
    dK.noalias() += dZ1 * w.W1.transpose();
    dK -= dT;
    g.dq.middleRows(t0, n) = dQ;
    g.dk.middleRows(t0, n) = dK;
    g.dv.middleRows(t0, n) = dT;
    d = std::move(nw);
  }
};

// The forward of one head over its whole sequence from `w` (left at the state after the last
// full mini-batch): out rows `ld` apart. The tests' double-precision reference.
template <class S>
void forward_head(const HeadInputs<S>& in, HeadWeights<S>& w, S* out, int64_t ld) {
  MiniBatch<S> mb;
  for (int64_t t = 0; t < in.L; t += in.K) {
    const int64_t n = std::min(in.K, in.L - t);
    mb.keys(in, w, t, n);
    mb.queries(in, w, out + t * ld, ld);
    if (n == in.K) mb.update(in, w);
  }
}

// The backward of one head. checkpoint(c) returns the state before mini-batch c * group.
template <class S, class Checkpoint>
void backward_head(const HeadInputs<S>& in, Checkpoint&& checkpoint, int64_t group, const S* dout, int64_t ld,
                   HeadGrads<S>& g) {
  const int64_t K = in.K, L = in.L, f = in.f, F = in.F;
  const int64_t M = (L + K - 1) / K, Mc = (M + group - 1) / group;
  g.dq.setZero(L, f);
  g.dk.setZero(L, f);
  g.dv.setZero(L, f);
  g.dlr.setZero(L);
  g.dtau.setZero(K);
  g.dgamma.setZero(f);
  g.dbeta.setZero(f);
  g.dw.zero(f, F, in.mlp);
  std::vector<HeadWeights<S>> states(size_t(std::min(group, M)));
  MiniBatch<S> mb;
  for (int64_t c = Mc - 1; c >= 0; --c) {
    const int64_t m0 = c * group, m1 = std::min(M, m0 + group);
    // Rebuild the start state of every mini-batch of the group from its checkpoint.
    checkpoint(c, states[0]);
    for (int64_t m = m0; m + 1 < m1; ++m) {
      states[size_t(m - m0 + 1)] = states[size_t(m - m0)];
      mb.keys(in, states[size_t(m - m0)], m * K, K);
      mb.update(in, states[size_t(m - m0 + 1)]);
    }
    for (int64_t m = m1 - 1; m >= m0; --m) {
      const int64_t t0 = m * K, n = std::min(K, L - t0);
      const HeadWeights<S>& w = states[size_t(m - m0)];
      mb.keys(in, w, t0, n);
      mb.queries(in, w);
      // The last mini-batch's update feeds nothing (and a short one's is thrown away).
      mb.backward(in, w, dout + t0 * ld, ld, n == K && m + 1 < M, g.dw, g);
    }
  }
}

}  // namespace cpu_grad

template <>
struct TttBackwardKernels<Cpu> {
  // See ttt_backward_kernels.hpp for the contract.
  static void inner_backward(const TttInnerBackwardArgs<Cpu>& a) {
    const bool mlp = a.kind == TttConfig::Kind::mlp;
    const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3);
    const int64_t K = a.mini_batch_size, F = a.W1c.size(3), G = a.group;
    const int64_t Mc = ttt_num_checkpoints(L, K, G);
    TTT_CHECK(G >= 1, "TttBackwardKernels<Cpu>::inner_backward: group must be >= 1, got ", G);
    TTT_CHECK(a.W1c.size(0) == Mc * Bn && a.b1c.size(0) == Mc * Bn && (!mlp || a.W2c.size(0) == Mc * Bn),
              "TttBackwardKernels<Cpu>::inner_backward: checkpoints ", a.W1c.shape().str(), " for ", Mc,
              " checkpoints of batch ", Bn);
    for (const Tensor<float, Cpu>* t : {&a.xq, &a.xk, &a.xv, &a.lr, &a.dxq, &a.dxk, &a.dxv, &a.dlr, &a.W1c, &a.b1c})
      TTT_CHECK(t->is_contiguous(), "TttBackwardKernels<Cpu>::inner_backward: inputs and outputs must be contiguous");
    TTT_CHECK(a.dout.stride(3) == 1, "TttBackwardKernels<Cpu>::inner_backward: dout needs a unit last stride");
    const int64_t tasks = Bn * nh;
    const int64_t nW1 = f * F, nW2 = mlp ? F * f : 0;
    [[maybe_unused]] const int nt = tasks * L * f * F >= (int64_t(1) << 18)
                                        ? int(std::min<int64_t>(cpu::num_threads(), tasks))
                                        : 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t b = i / nh, h = i % nh;
      cpu_grad::HeadInputs<float> in;
      in.mlp = mlp, in.L = L, in.f = f, in.F = F, in.K = K, in.eps = a.eps;
      in.q = a.xq.data() + i * L * f;
      in.k = a.xk.data() + i * L * f;
      in.v = a.xv.data() + i * L * f;
      in.lr = a.lr.data() + i * L;
      in.tau = a.tau.data();
      in.gamma = a.ln_weight.data() + h * f;
      in.beta = a.ln_bias.data() + h * f;
      auto checkpoint = [&](int64_t c, cpu_grad::HeadWeights<float>& w) {
        const int64_t row = (c * Bn + b) * nh + h;
        w.W1 = cpu_grad::ConstMap<float>(a.W1c.data() + row * nW1, f, F);
        w.b1 = cpu_grad::ConstMap<float>(a.b1c.data() + row * F, 1, F);
        if (mlp) {
          w.W2 = cpu_grad::ConstMap<float>(a.W2c.data() + row * nW2, F, f);
          w.b2 = cpu_grad::ConstMap<float>(a.b2c.data() + row * f, 1, f);
        }
      };
      const float* dout = a.dout.data() + b * a.dout.stride(0) + h * a.dout.stride(1);
      cpu_grad::HeadGrads<float> g;
      cpu_grad::backward_head(in, checkpoint, G, dout, a.dout.stride(2), g);
      auto put = [](float* dst, const auto& m) { std::copy(m.data(), m.data() + m.size(), dst); };
      put(a.dxq.data() + i * L * f, g.dq);
      put(a.dxk.data() + i * L * f, g.dk);
      put(a.dxv.data() + i * L * f, g.dv);
      put(a.dlr.data() + i * L, g.dlr);
      put(a.dtau.data() + i * K, g.dtau);
      put(a.dln_weight.data() + i * f, g.dgamma);
      put(a.dln_bias.data() + i * f, g.dbeta);
      put(a.dW1.data() + i * nW1, g.dw.W1);
      put(a.db1.data() + i * F, g.dw.b1);
      if (mlp) {
        put(a.dW2.data() + i * nW2, g.dw.W2);
        put(a.db2.data() + i * f, g.dw.b2);
      }
    }
  }
};

}  // namespace ttt::layers
