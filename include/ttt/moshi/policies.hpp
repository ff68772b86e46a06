#pragma once
// The compile-time list of temporal-layer policies the engine is built with. A config's
// "ttt" list picks one per layer by its `design` name; unlisted layers are plain Moshi
// attention layers. To add a design, write a policy (see layer.hpp for the interface) and
// list it here, or instantiate the model with your own PolicyList (examples/custom_policy.cpp).
#include "ttt/moshi/layer.hpp"
#include "ttt/moshi/ttt_layers.hpp"

namespace ttt::moshi {

using DefaultPolicies = PolicyList<AttentionLayer, ReplaceLayer, AfterAttentionLayer, InplaceFfnLayer, KvMemoryLayer>;

}  // namespace ttt::moshi
