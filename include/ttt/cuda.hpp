#pragma once
// The CUDA backend for any C++ translation unit: Memory<Cuda>, the stream context and
// the declarations of Kernels<Cuda>. Link ttt::cuda and compile ttt/cuda.cuh in one
// nvcc translation unit of the program to get the definitions.
#include "ttt/core.hpp"
#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/memory.hpp"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/graph.hpp"
#include "ttt/backend/cuda/timing.hpp"
#include "ttt/layers/cuda/ttt_backward_kernels.hpp"
#include "ttt/layers/cuda/ttt_kernels.hpp"
