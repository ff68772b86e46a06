#pragma once
// The tensor core and the CPU backend: Tensor<T, B>, the op set (ops::), and Kernels<Cpu>.
// Everything else builds on these; ttt/ttt.hpp includes this and the rest of the library.
#include "ttt/config.hpp"
#include "ttt/core/arena.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/core/workspace.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/backend/ops_conv.hpp"
#include "ttt/backend/timing.hpp"
#include "ttt/backend/cpu/kernels.hpp"
