// qkv bench: attention throughput beside the machine's GEMM throughput, measured in one run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/tensor.hpp"

namespace qkv::bench {

// One attention problem to time. Layout [B, N, H, D], float32, the default scaled_dot score.
struct Shape {
  std::string name;
  std::int64_t batch = 1, q_heads = 8, kv_heads = 8, q_len = 1024, k_len = 1024, head_dim = 64;
  bool causal = false;
};

// S1 … S5 of issue 3: S1 B1 H8 N1024 D64, S2 B1 H8 N4096 D64, S3 B1 H8 N4096 D128,
// S4 decode B1 H32 Nq1 Nk8192 D128, S5 = S2 causal.
std::vector<Shape> default_shapes();

// A shape by name (S1 … S5) or spec: B<b>H<h>[Hk<hk>](N<n>|Nq<nq>Nk<nk>)D<d>[causal],
// e.g. "B1H8N4096D64causal" or "B1H32Nq1Nk8192D128". Throws qkv::Error naming the spec.
Shape parse_shape(const std::string& spec);

// FLOPs of DESIGN.md §8: 4·Nq·Nk·D per head, counting only visible pairs when causal.
double attention_flops(const Shape& shape);

struct GemmResult {
  double gflops = 0;
  std::string kernel;    // OpenBLAS's core name, the kernel family that ran
  std::string coretype;  // OPENBLAS_CORETYPE if set (it forces that kernel family)
};

// OpenBLAS sgemm of 2048³ (median of several runs).
GemmResult measure_sgemm(int threads);

struct ShapeResult {
  Shape shape;
  double median_ms = 0, gflops = 0, ratio_to_sgemm = 0;
  // Peak resident memory of the process while the shape ran (inputs included; memory still held
  // from earlier shapes too: run one shape alone for its own figure).
  double peak_mib = 0;
  // GEMM → softmax → GEMM with the N×N matrix; 0 when that matrix would exceed 2 GiB.
  double naive_ms = 0, speedup_over_naive = 0;
};

// Times qkv's attention_forward on one shape with inputs and output in `dtype` (float32 or
// bfloat16), and the naive float32 baseline.
ShapeResult measure_shape(const Shape& shape, DType dtype, int threads, double sgemm_gflops,
                          int repetitions);

}  // namespace qkv::bench
