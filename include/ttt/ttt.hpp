#pragma once
// Umbrella header, CPU backend: the tensor core (ttt/core.hpp), I/O, the nn building blocks
// and the generic streaming transformer, the TTT layers, and the Moshi engine with its
// TTT designs. Audio files (io/audio.hpp) come too when the program links ttt::audio
// (TTT_WITH_AUDIO), Ogg Opus streams (io/opus_stream.hpp) when it links ttt::opus (TTT_WITH_OPUS). For the CUDA backend also include ttt/cuda.hpp (declarations, any
// compiler) and compile ttt/cuda.cuh in one nvcc translation unit (definitions).
#include "ttt/core.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#if TTT_WITH_AUDIO
#include "ttt/io/audio.hpp"
#endif
#if TTT_WITH_OPUS
#include "ttt/io/opus_stream.hpp"
#endif
#include "ttt/nn/embedding.hpp"
#include "ttt/nn/layer.hpp"
#include "ttt/nn/transformer.hpp"
#include "ttt/layers/gating.hpp"
#include "ttt/layers/cpu/ttt_backward_kernels.hpp"
#include "ttt/layers/cpu/ttt_kernels.hpp"
#include "ttt/layers/ttt_backward.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/lm.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/serve/conversation_batch.hpp"
