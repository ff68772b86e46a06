// The CUDA backend definitions for the test programs: the one nvcc translation unit.
#include "ttt/cuda.cuh"
