#pragma once
// The compile-time list of temporal-layer policies the engine is built with. A config's
// "ttt" list picks one per layer by its `design` name (docs/designs.md); unlisted layers are
// plain attention layers. To add a design, write a policy (nn/layer.hpp has the interface)
// and list it here, or instantiate the model with your own list (examples/custom_policy.cpp).
#include "ttt/moshi/design_after_attention.hpp"
#include "ttt/moshi/design_inplace_ffn.hpp"
#include "ttt/moshi/design_kv_memory.hpp"
#include "ttt/moshi/design_replace.hpp"
#include "ttt/nn/layer.hpp"

namespace ttt::moshi {

using DefaultPolicies =
    nn::PolicyList<nn::AttentionLayer, ReplaceLayer, AfterAttentionLayer, InplaceFfnLayer, KvMemoryLayer>;

}  // namespace ttt::moshi
