// All of qkv's public API.
#pragma once

#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/explain.hpp"
#include "qkv/kv_cache.hpp"
#include "qkv/linear.hpp"
#include "qkv/merge.hpp"
#include "qkv/multihead_attention.hpp"
#include "qkv/npy.hpp"
#include "qkv/reference.hpp"
#include "qkv/safetensors.hpp"
#include "qkv/simd.hpp"
#include "qkv/tensor.hpp"
