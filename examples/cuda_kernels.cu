// The one nvcc translation unit of the command-line tools: instantiates the CUDA backend.
#include "ttt/cuda.cuh"
