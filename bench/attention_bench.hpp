// qkv bench: attention throughput beside the machine's GEMM throughput, measured in one run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/tensor.hpp"

namespace qkv::bench {

// One attention problem to time. Layout [B, N, H, D], float32, the default scaled_dot score.
// additive_dim > 0 makes it the additive score with A = additive_dim (random Wq, Wk, v).
struct Shape {
  std::string name;
  std::int64_t batch = 1, q_heads = 8, kv_heads = 8, q_len = 1024, k_len = 1024, head_dim = 64;
  std::int64_t value_dim = 64;  // Dv: head_dim unless the spec gives Dv<dv> (DeepSeek's MLA)
  std::int64_t additive_dim = 0;
  bool causal = false;
  // A block mask (blocks of 128 × 128) built from a mask_mod: documents of this many positions
  // (a query sees its own document), or a causal sliding window (q − window <= kv <= q).
  std::int64_t documents = 0, sliding_window = 0;
  // Position masks (options, not a block mask): a window of this many keys to the left (−1:
  // none), and StreamingLLM's sink tokens kept past it.
  std::int64_t window = -1, sink_tokens = 0;
  bool sinks = false;    // learned attention sinks, one per query head
  bool sigmoid = false;  // sigmoid attention (normalization sigmoid)
  // A KV cache read by attention_with_kv_cache (forward only): K and V in pages of this many
  // positions (0: not a cache shape); ragged: sequence b holds Nk/16 + (Nk − Nk/16)·b/(B − 1)
  // keys (from Nk/16 to Nk), else Nk each.
  std::int64_t page_size = 0;
  bool ragged = false;
  bool kv_cache() const { return page_size > 0; }
  // Keys of sequence b (Nk unless ragged), and of all sequences.
  std::int64_t sequence_length(std::int64_t b) const;
  std::int64_t total_keys() const;
  // Whether the GEMM → softmax → GEMM baseline computes this shape (it knows no masks but causal,
  // no sinks, no sigmoid).
  bool baseline_applies() const {
    return !block_masked() && window < 0 && !sinks && !sigmoid && !kv_cache();
  }
  // Whether the shape's documents or sliding window are given as a block mask.
  bool block_masked() const { return documents > 0 || sliding_window > 0; }
  // The share of the Nq × Nk pairs the masks leave visible (1 without masks).
  double visible_share() const;
  // Whether query i sees key j under the shape's masks.
  bool visible(std::int64_t i, std::int64_t j) const;
};

// S1 … S5 of issue 3: S1 B1 H8 N1024 D64, S2 B1 H8 N4096 D64, S3 B1 H8 N4096 D128,
// S4 decode B1 H32 Nq1 Nk8192 D128, S5 = S2 causal.
std::vector<Shape> default_shapes();

// A shape by name (S1 … S5; A1 = B1H8N1024D64A64, the additive score; M1 = S2 with 8 documents
// of 512, M2 = S2 with a sliding window of 256) or spec:
// B<b>H<h>[Hk<hk>](N<n>|Nq<nq>Nk<nk>)D<d>[A<a>][docs<n>|slide<w>][window<w>[sinktokens<n>]][causal],
// e.g.
// "B1H8N4096D64causal", "B1H8N4096D64docs512" or "B1H32Nq1Nk8192D128"; either followed by
// "sinks" (e.g. "S2sinks") adds attention sinks, by "sigmoid" makes it sigmoid attention. A
// "page<p>" field makes it a paged KV cache (read through attention_with_kv_cache), "ragged" after
// it spreads the sequences' lengths; K1 = B16H32Hk8Nq1Nk8192D128page16ragged (a ragged, paged
// decoding batch: lengths from 512 to 8192, pages of 16). Throws qkv::Error naming the spec.
Shape parse_shape(const std::string& spec);

// FLOPs of docs/contract.md §8: 4·Nq·Nk·D per head, counting only the visible pairs under masks.
double attention_flops(const Shape& shape);

// Backward FLOPs of docs/contract.md §8: 2.5 × the forward's.
double backward_flops(const Shape& shape);

struct GemmResult {
  double gflops = 0;
  std::string kernel;    // OpenBLAS's core name, the kernel family that ran
  std::string coretype;  // OPENBLAS_CORETYPE if set (it forces that kernel family)
};

// The processor as the system names it: /proc/cpuinfo's "model name" (x86), or the implementer
// and part numbers an ARM core reports; "unknown" where neither is readable.
std::string cpu_name();

// OpenBLAS sgemm of 2048³ (median of several runs).
GemmResult measure_sgemm(int threads);

// Returns once OpenBLAS's threads, which spin for a while after each call waiting for more work,
// have gone to sleep (a fixed pause, longer than their spin).
void wait_for_openblas_threads_to_sleep();

// The median of `values` (not empty).
double median(std::vector<double> values);

// Memory read bandwidth in GB/s: a 512 MiB buffer read by `threads` threads in the vectors of the
// SIMD target the kernels run on (QKV_SIMD applied first), median of runs.
double measure_read_bandwidth(int threads);

// Bytes of K and V that attention must read at least once.
double key_value_bytes(const Shape& shape, DType dtype);

struct ShapeResult {
  Shape shape;
  DType dtype = DType::float32;
  double median_ms = 0, gflops = 0;
  // The OpenBLAS sgemm measured right after the shape, and gflops over it.
  double sgemm_gflops = 0, ratio_to_sgemm = 0;
  // Peak resident memory of the process while the shape ran (inputs included; memory still held
  // from earlier shapes too: run one shape alone for its own figure).
  double peak_mib = 0;
  // The memory floor: key_value_bytes at the measured bandwidth.
  double floor_ms = 0;
  // Additive shapes: tanh evaluations per second (Nq·Nk·A per head), their unit of work.
  double tanh_per_second = 0;
  // The baseline: GEMM → softmax → GEMM with the N×N matrix (0 when that matrix would exceed
  // 2 GiB); for additive shapes, every score computed plainly with std::tanh into that matrix.
  double naive_ms = 0, speedup_over_naive = 0;
  // Shapes with a block mask (documents, a sliding window): the same shape without it, measured
  // right after, and the share of (query, key) pairs the mask shows: the time the mask should
  // take, as a share of dense_ms.
  double dense_ms = 0, visible_share = 1;
};

// Phase 1: qkv's attention_forward on one shape, inputs and output in `dtype` (float32 or
// bfloat16): time, throughput, memory floor, peak memory. ratio_to_sgemm is left for the caller.
ShapeResult measure_qkv(const Shape& shape, DType dtype, int threads, double bandwidth_gbs,
                        int repetitions);

// Phase 1 of the backward pass: attention_backward (dQ, dK, dV) from the saved O and LSE of one
// forward, inputs and gradients in `dtype`. No floor or baseline.
ShapeResult measure_qkv_backward(const Shape& shape, DType dtype, int threads, int repetitions);

// Phase 2: the baseline of a measured shape. Run after every qkv timing: OpenBLAS's worker threads
// keep spinning for a while after each call and would otherwise share the cores with qkv.
void measure_baseline(ShapeResult& result, int threads, int repetitions);

}  // namespace qkv::bench
