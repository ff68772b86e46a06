#pragma once
// Kernels<Cuda> definitions (nvcc only). Every op runs on the calling thread's stream and
// computes the CPU backend's function: same scalar formulas (ttt/backend/math.hpp), float
// arithmetic for every T, same tie and NaN rules. ttt/cuda.cuh instantiates them.
//
// One header per op family (backend/cuda/kernels/), each a sequence of sections: a params
// struct, its kernel(s), then the Kernels<Cuda> entry points that launch them. The device
// utilities they share (launch, grid sizing, vector loads, reductions) are
// backend/cuda/device.cuh, which also states the namespaces of the CUDA code.
#include "ttt/backend/cuda/kernels/attention.cuh"
#include "ttt/backend/cuda/kernels/backward.cuh"
#include "ttt/backend/cuda/kernels/conv.cuh"
#include "ttt/backend/cuda/kernels/elementwise.cuh"
#include "ttt/backend/cuda/kernels/linear.cuh"
#include "ttt/backend/cuda/kernels/linear_quant.cuh"
#include "ttt/backend/cuda/kernels/random.cuh"
#include "ttt/backend/cuda/kernels/rows.cuh"
#include "ttt/backend/cuda/kernels/vq.cuh"
