#pragma once
// Umbrella header: the tensor core, the CPU backend, I/O, layers and the Moshi engine.
// For the CUDA backend also include ttt/cuda.hpp (declarations, any compiler) and compile
// ttt/cuda.cuh in one nvcc translation unit (definitions).
#include "ttt/config.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/backend/cpu/kernels.hpp"
