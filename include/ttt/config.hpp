// ttt: Test-Time Training layers and a streaming Moshi engine.
// This header owns every macro of the library.
#pragma once

#define TTT_VERSION_MAJOR 0
#define TTT_VERSION_MINOR 1
#define TTT_VERSION_PATCH 0
#define TTT_VERSION_STRING "0.1.0"

// Functions usable from both host and device code (dtype conversions, RNG).
#if defined(__CUDACC__)
#define TTT_HD __host__ __device__
#define TTT_DEVICE __device__
#else
#define TTT_HD
#define TTT_DEVICE
#endif

#if defined(__CUDACC__) || defined(__clang__) || defined(__GNUC__)
#define TTT_RESTRICT __restrict__
#else
#define TTT_RESTRICT
#endif

// Set by the ttt::cuda CMake target: the CUDA backend's declarations are available
// (the definitions come from ttt/cuda.cuh, compiled by nvcc in one translation unit).
#ifndef TTT_WITH_CUDA
#define TTT_WITH_CUDA 0
#endif

// Set by the ttt::audio CMake target: libsndfile and libsoxr are linked, so the audio file
// layer (ttt/io/audio.hpp) can be used.
#ifndef TTT_WITH_AUDIO
#define TTT_WITH_AUDIO 0
#endif

// Set by the ttt::opus CMake target: libopus and libogg are linked, so the Ogg Opus stream
// writer and reader (ttt/io/opus_stream.hpp) can be used.
#ifndef TTT_WITH_OPUS
#define TTT_WITH_OPUS 0
#endif

namespace ttt {
inline constexpr int kMaxRank = 4;
}  // namespace ttt
