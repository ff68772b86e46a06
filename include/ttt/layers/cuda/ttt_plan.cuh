#pragma once
// TttKernels<Cuda>::plan (nvcc only): which inner kernel a call runs, from its shape, the
// operand precision, the tuning knobs and what the device offers (shared memory a block may
// opt into, clusters and how many can be resident), and whether the tensors suit the kernels.
// The queries are host calls, cached per device so that a decode step does not pay them.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/layers/cuda/ttt_decode.cuh"
#include "ttt/layers/cuda/ttt_inner_common.cuh"
#include "ttt/layers/cuda/ttt_inner_fp32.cuh"
#include "ttt/layers/cuda/ttt_kernels.hpp"
#include "ttt/layers/cuda/ttt_mma.cuh"

namespace ttt::layers::cuda_kernels {

struct DeviceInfo {
  int device = -1;
  int sm_count = 0;
  int smem_optin = 0;  // bytes of dynamic shared memory a block may opt into
  int cc_major = 0;
  bool clusters = false;
};

inline const DeviceInfo& device_info() {
  thread_local DeviceInfo info;
  int dev = 0;
  TTT_CUDA_CHECK(cudaGetDevice(&dev));
  if (info.device != dev) {
    info.device = dev;
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev));
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    int cl = 0;
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, dev));
#if defined(_CG_HAS_CLUSTER_GROUP)
    info.clusters = cl != 0;
#else
    info.clusters = false;
#endif
  }
  return info;
}

using InnerKernel = void (*)(InnerParams);

inline InnerKernel inner_kernel(bool mlp) { return mlp ? fp32::ttt_mlp_kernel : fp32::ttt_linear_kernel; }

// The tensor-core kernel for a shape (null when none): TTT-Linear with f = 64 or 128,
// TTT-MLP with f = 128 (hidden units in CTAs of 128).
inline InnerKernel tc_kernel(bool mlp, int64_t f) {
  if (mlp) return f == 128 ? mma::ttt_mlp_tc_kernel : nullptr;
  if (f == 64) return mma::ttt_linear_tc_kernel<64>;
  if (f == 128) return mma::ttt_linear_tc_kernel<128>;
  return nullptr;
}
inline int64_t tc_smem(bool mlp, int64_t f) {
  if (mlp) return int64_t(mma::MlpLayout::bytes);
  return f == 64 ? int64_t(mma::LinearLayout<64>::bytes) : int64_t(mma::LinearLayout<128>::bytes);
}
inline int tc_threads(bool mlp, int64_t f) { return mlp ? mma::MlpLayout::THREADS : int(2 * f); }

// Head dims with a one-token TTT-Linear kernel (clusters of f / 32 CTAs: f > 32 needs them).
inline bool has_decode_kernel(int64_t f) {
  return f == 32 || ((f == 64 || f == 128) && device_info().clusters);
}

// Raises a kernel's dynamic shared-memory limit once per size (a host-side attribute).
inline void allow_smem(InnerKernel k, int64_t bytes) {
  struct Entry {
    int device;
    InnerKernel kernel;
    int64_t bytes;
  };
  thread_local std::vector<Entry> done;
  const int device = device_info().device;
  for (const Entry& e : done)
    if (e.device == device && e.kernel == k && e.bytes >= bytes) return;
  if (bytes > 48 * 1024) TTT_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done.push_back({device, k, bytes});
}

// Whether clusters of nc CTAs of `threads` threads and `bytes` shared memory can be resident
// at all (cached: the occupancy query is a host call that a decode step should not pay).
inline int resident_clusters(InnerKernel k, int nc, int threads, int64_t bytes) {
  struct Entry {
    int device;
    InnerKernel kernel;
    int nc;
    int64_t bytes;
    int count;
  };
  thread_local std::vector<Entry> cache;
  const int device = device_info().device;
  for (const Entry& e : cache)
    if (e.device == device && e.kernel == k && e.nc == nc && e.bytes == bytes) return e.count;
  allow_smem(k, bytes);
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = launch_config(unsigned(nc), unsigned(threads), size_t(bytes), nc, false, attr);
  int count = 0;
  if (nc > 1) {
    if (cudaOccupancyMaxActiveClusters(&count, k, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      count = 0;
    }
  } else {
    int per_sm = 0;
    TTT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, size_t(bytes)));
    count = per_sm * device_info().sm_count;
  }
  cache.push_back({device, k, nc, bytes, count});
  return count;
}
inline bool clusters_fit(InnerKernel k, int nc, int threads, int64_t bytes) {
  return resident_clusters(k, nc, threads, bytes) > 0;
}

// Empty when the tensors suit the kernels (contiguous, 16-byte aligned, expected shapes).
inline std::string device_layout_problem(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, bool mlp) {
  const Tensor<float, Cuda>* all[] = {&a.xq, &a.xk, &a.xv, &a.lr, &a.tau, &a.ln_weight, &a.ln_bias,
                                      &s.W1, &s.b1, &s.W1_grad, &s.b1_grad, &s.W2, &s.b2, &s.W2_grad, &s.b2_grad};
  const int n_all = mlp ? 15 : 11;
  for (int i = 0; i < n_all; ++i)
    if (!all[i]->defined() || !all[i]->is_contiguous()) return "a tensor is undefined or not contiguous";
  if (!a.out.defined() || a.out.rank() != 4 || a.out.stride(3) != 1) return "out's last dimension is not dense";
  const Tensor<float, Cuda>* vec[] = {&a.xq, &a.xk, &a.xv, &s.W1, &s.W1_grad, &s.W2, &s.W2_grad};
  for (int i = 0; i < (mlp ? 7 : 5); ++i)
    if (!aligned16(vec[i]->data())) return "a tensor is not 16-byte aligned";
  return {};
}

}  // namespace ttt::layers::cuda_kernels

namespace ttt::layers {

TttCudaPlan TttKernels<Cuda>::plan(TttConfig::Kind kind, int64_t batch, int64_t heads, int64_t L, int64_t f,
                                   int64_t F, int64_t K, TttOperands operands) {
  using namespace cuda_kernels;
  TttCudaPlan pl;
  const bool mlp = kind == TttConfig::Kind::mlp;
  const TttCudaTuning& tune = tuning();
  if (tune.host_fallback) {
    pl.why_host = "host fallback requested";
    return pl;
  }
  if (f % 4 != 0 || F % 4 != 0) {
    pl.why_host = "head_dim and inner width must be multiples of 4";
    return pl;
  }
  if (f > 4096 || F > 65536 || K > 4096 || K <= 0) {
    pl.why_host = "sizes outside the kernels' range";
    return pl;
  }
  const DeviceInfo& dev = device_info();
  if (!mlp && L == 1 && F == f && K <= 32 && has_decode_kernel(f) && tune.decode_kernel && tune.cluster == 0) {
    pl.device = true;
    pl.decode = true;
    pl.cluster = f == 32 ? 1 : int(f / 32);
    pl.rows = 1;
    return pl;
  }
  if (mlp && L == 1 && f == decode::MlpDecodeLayout::HD && F % decode::MlpDecodeLayout::FH == 0 &&
      F / decode::MlpDecodeLayout::FH <= decode::MlpDecodeLayout::MAX_NC &&
      (F == decode::MlpDecodeLayout::FH || dev.clusters) && tune.decode_kernel && tune.cluster == 0) {
    pl.device = true;
    pl.decode = true;
    pl.cluster = int(F / decode::MlpDecodeLayout::FH);
    pl.rows = 1;
    return pl;
  }
  if (operands == TttOperands::bf16 && tune.tensor_cores && tune.cluster == 0 && K <= mma::kTile &&
      dev.cc_major >= 8) {
    const InnerKernel k = tc_kernel(mlp, f);
    const int nc = mlp ? int(F / mma::MlpLayout::FC) : 1;
    const bool shape_ok = mlp ? (F % mma::MlpLayout::FC == 0 && nc >= 1 && nc <= mma::kMaxMlpCluster) : F == f;
    const int64_t bytes = k ? tc_smem(mlp, f) : 0;
    if (k && shape_ok && bytes <= dev.smem_optin && (nc == 1 || (dev.clusters && clusters_fit(k, nc, tc_threads(mlp, f), bytes)))) {
      pl.device = true;
      pl.tensor_cores = true;
      pl.cluster = nc;
      pl.rows = mma::kTile;
      pl.smem_bytes = bytes;
      pl.resident = resident_clusters(k, nc, tc_threads(mlp, f), bytes);
      return pl;
    }
  }
  const int R = int(ceil4(std::min(K, std::max<int64_t>(L, 1))));
  struct Option {
    int nc;
    int64_t bytes;
  };
  std::vector<Option> options;
  for (int nc = 1; nc <= kMaxCluster; nc *= 2) {
    if (F % nc != 0 || (F / nc) % 4 != 0) continue;
    if (nc > 1 && !dev.clusters) continue;
    const int64_t bytes = int64_t(inner_smem(mlp, int(f), int(F), nc, R, int(K)).total) * int64_t(sizeof(float));
    if (bytes > dev.smem_optin) continue;
    if (nc > 1 && !clusters_fit(inner_kernel(mlp), nc, kThreads, bytes)) continue;
    options.push_back({nc, bytes});
  }
  const Option* pick = nullptr;
  if (tune.cluster > 0) {
    for (const Option& o : options)
      if (o.nc == tune.cluster) pick = &o;
    TTT_CHECK(pick, "TttKernels<Cuda>: cluster size ", tune.cluster, " is not feasible for ", mlp ? "mlp" : "linear",
              " f=", f, " F=", F, " K=", K, " on this device");
  } else if (!options.empty()) {
    // The smallest cluster that spreads the heads over most of the GPU (a cluster of CTAs per
    // (b, h) only pays when there are fewer heads than SMs), else the largest that fits.
    const int64_t target = std::max<int64_t>(1, int64_t(dev.sm_count) * 3 / 4);
    pick = &options.back();
    for (const Option& o : options)
      if (batch * heads * o.nc >= target) {
        pick = &o;
        break;
      }
  }
  if (!pick) {
    pl.why_host = "the state does not fit in shared memory at any cluster size";
    return pl;
  }
  pl.device = true;
  pl.cluster = pick->nc;
  pl.rows = R;
  pl.smem_bytes = pick->bytes;
  return pl;
}

}  // namespace ttt::layers
