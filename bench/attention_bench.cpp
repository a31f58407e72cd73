// The measurements behind `qkv bench`. Every figure is a median over repetitions after one warm-up
// run; the GEMM yardstick is measured in the same process, so ratios hold on a noisy machine.

#include "attention_bench.hpp"

#include <cblas.h>
#include <fmt/format.h>
#include <hwy/aligned_allocator.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <thread>

#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/kv_cache.hpp"
#include "qkv/simd.hpp"
#include "read_loop.hpp"

namespace qkv::bench {

namespace {

constexpr double kNaiveLimitBytes = 2.0 * 1024 * 1024 * 1024;

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

template <class Work>
double median_ms(int repetitions, Work work) {
  work();  // warm-up: page faults, caches, thread start
  std::vector<double> times;
  for (int r = 0; r < repetitions; ++r) {
    const auto start = std::chrono::steady_clock::now();
    work();
    times.push_back(milliseconds_since(start));
  }
  return median(times);
}

// Peak resident memory: reset the high-water mark (Linux clear_refs 5), then read VmHWM.
void reset_peak_memory() {
  std::ofstream("/proc/self/clear_refs") << "5";
}
double peak_memory_mib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0.0;
}

std::vector<float> random_floats(std::size_t count, std::uint64_t seed) {
  std::vector<float> values(count);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (float& v : values) v = normal(rng);
  return values;
}

// The baseline a user can write with a BLAS: per head S = scale·Q Kᵀ (N×N, materialized),
// masked, softmax per row, O = P V.
// Each row of the [Nq, Nk] scores turned into its softmax (keys past the causal diagonal 0).
void softmax_rows(const Shape& s, std::vector<float>& scores) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < s.q_len; ++i) {
    float* row = scores.data() + i * s.k_len;
    const std::int64_t visible = s.causal ? std::min(s.k_len, i + s.k_len - s.q_len + 1) : s.k_len;
    float row_max = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j < visible; ++j) row_max = std::max(row_max, row[j]);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < visible; ++j) sum += row[j] = std::exp(row[j] - row_max);
    const float inverse = sum > 0 ? 1.0f / sum : 0.0f;
    for (std::int64_t j = 0; j < visible; ++j) row[j] *= inverse;
    for (std::int64_t j = std::max<std::int64_t>(visible, 0); j < s.k_len; ++j) row[j] = 0.0f;
  }
}

// The baseline's steps for each (batch, head): fill_scores(q, q row stride, k, k row stride)
// writes the head's [Nq, Nk] scores, then their softmax and the average of V (OpenBLAS).
template <class FillScores>
void naive_per_head(const Shape& s, const float* q, const float* k, const float* v, float* out,
                    std::vector<float>& scores, FillScores fill_scores) {
  const std::int64_t d = s.head_dim, dv = s.value_dim, group = s.q_heads / s.kv_heads;
  const auto nq = static_cast<int>(s.q_len), nk = static_cast<int>(s.k_len);
  const auto q_stride = static_cast<int>(s.q_heads * d),
             k_stride = static_cast<int>(s.kv_heads * d),
             v_stride = static_cast<int>(s.kv_heads * dv),
             out_stride = static_cast<int>(s.q_heads * dv);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      const std::int64_t hk = h / group;
      const float* kh = k + (b * s.k_len * s.kv_heads + hk) * d;
      const float* vh = v + (b * s.k_len * s.kv_heads + hk) * dv;
      fill_scores(q + (b * s.q_len * s.q_heads + h) * d, q_stride, kh, k_stride);
      softmax_rows(s, scores);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, static_cast<int>(dv), nk, 1.0f,
                  scores.data(), nk, vh, v_stride, 0.0f, out + (b * s.q_len * s.q_heads + h) * dv,
                  out_stride);
    }
  }
}

// Scaled dot scores by one GEMM per head.
void naive_attention(const Shape& s, const float* q, const float* k, const float* v, float* out,
                     std::vector<float>& scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const auto nq = static_cast<int>(s.q_len), nk = static_cast<int>(s.k_len);
  naive_per_head(s, q, k, v, out, scores, [&](const float* qh, int qs, const float* kh, int ks) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, static_cast<int>(s.head_dim),
                scale, qh, qs, kh, ks, 0.0f, scores.data(), nk);
  });
}

// The additive score done plainly, the baseline of the additive shapes: per head q' = Wq q and
// k' = Wk k (OpenBLAS), then every score Σ_a v_a tanh(q'_a + k'_a) with std::tanh.
void naive_additive_attention(const Shape& s, const float* q, const float* k, const float* v,
                              const float* wq, const float* wk, const float* va, float* out,
                              std::vector<float>& scores) {
  const std::int64_t a = s.additive_dim;
  const auto nq = static_cast<int>(s.q_len), nk = static_cast<int>(s.k_len);
  const auto di = static_cast<int>(s.head_dim), ai = static_cast<int>(a);
  std::vector<float> q_proj(static_cast<std::size_t>(s.q_len * a));
  std::vector<float> k_proj(static_cast<std::size_t>(s.k_len * a));
  naive_per_head(s, q, k, v, out, scores, [&](const float* qh, int qs, const float* kh, int ks) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, ai, di, 1.0f, qh, qs, wq, di, 0.0f,
                q_proj.data(), ai);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nk, ai, di, 1.0f, kh, ks, wk, di, 0.0f,
                k_proj.data(), ai);
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < s.q_len; ++i) {
      const float* qi = q_proj.data() + i * a;
      for (std::int64_t j = 0; j < s.k_len; ++j) {
        const float* kj = k_proj.data() + j * a;
        float score = 0.0f;
        for (std::int64_t t = 0; t < a; ++t) score += va[t] * std::tanh(qi[t] + kj[t]);
        scores[static_cast<std::size_t>(i * s.k_len + j)] = score;
      }
    }
  });
}

}  // namespace

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

void wait_for_openblas_threads_to_sleep() {
  // Each thread spins for a while (OpenBLAS's thread timeout, a number of cycles) before it waits
  // on a condition variable. 250 ms is more than enough: S1 measured after an sgemm and this pause
  // ran as fast as S1 measured first (Zen 4, four in a row, three runs).
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
}

std::vector<Shape> default_shapes() {
  return {parse_shape("S1"), parse_shape("S2"), parse_shape("S3"),
          parse_shape("S4"), parse_shape("S5"), parse_shape("A1")};
}

Shape parse_shape(const std::string& spec) {
  static const std::pair<const char*, const char*> kNamed[] = {
      {"S1", "B1H8N1024D64"},
      {"S2", "B1H8N4096D64"},
      {"S3", "B1H8N4096D128"},
      {"S4", "B1H32Nq1Nk8192D128"},
      {"A1", "B1H8N1024D64A64"},
      {"S5", "B1H8N4096D64causal"},
      {"M1", "B1H8N4096D64docs512"},
      {"M2", "B1H8N4096D64slide256"},
      {"K1", "B16H32Hk8Nq1Nk8192D128page16ragged"},
      // Head dims of recent models: Gemma's 256 (prefill, decode); DeepSeek's MLA, as attention
      // (queries and keys 192, values 128) and absorbed (one key/value head of 576, values 512).
      {"G1", "B1H8N4096D256"},
      {"G2", "B1H16Nq1Nk8192D256"},
      {"L1", "B1H16N4096D192Dv128"},
      {"L2", "B1H16Hk1N2048D576Dv512causal"},
      {"L3", "B1H16Hk1Nq1Nk8192D576Dv512"}};
  std::string text = spec;
  // Suffixes, in any order: sinks, sigmoid, ragged.
  bool sinks = false, sigmoid = false, ragged = false;
  for (bool found = true; found;) {
    found = false;
    for (auto [suffix, flag] : {std::pair{"sinks", &sinks}, std::pair{"sigmoid", &sigmoid},
                                std::pair{"ragged", &ragged}}) {
      const std::string_view end(suffix);
      if (text.size() > end.size() &&
          text.compare(text.size() - end.size(), end.size(), end) == 0) {
        text.resize(text.size() - end.size());
        *flag = found = true;
      }
    }
  }
  for (const auto& [name, definition] : kNamed) {
    if (text == name) text = definition;
  }
  if (text.size() > 6 && text.compare(text.size() - 6, 6, "ragged") == 0) {  // from a name
    text.resize(text.size() - 6);
    ragged = true;
  }
  const auto bad = [&spec] {
    return Error(fmt::format(
        "--shapes: expected S1 … S5, A1, M1, M2, K1, G1, G2, L1 … L3 or "
        "B<b>H<h>[Hk<hk>](N<n>|Nq<nq>Nk<nk>)D<d>[Dv<dv>][A<a>][docs<n>|slide<w>][window<w>"
        "[sinktokens<n>]]"
        "[page<p>[ragged]][causal], each "
        "optionally followed by sinks and sigmoid, got '{}'",
        spec));
  };
  Shape shape;
  shape.name = spec;
  shape.sinks = sinks;
  shape.sigmoid = sigmoid;
  if (text.size() >= 6 && text.compare(text.size() - 6, 6, "causal") == 0) {
    shape.causal = true;
    text.resize(text.size() - 6);
  }
  // Pairs of a field name and its number: B1 H8 Hk2 N4096 Nq1 Nk8192 D64.
  std::map<std::string, std::int64_t> fields;
  for (std::size_t at = 0; at < text.size();) {
    std::size_t digits = at;
    while (digits < text.size() && std::isalpha(static_cast<unsigned char>(text[digits]))) ++digits;
    std::size_t end = digits;
    while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
    if (digits == at || end == digits || end - digits > 12) throw bad();
    if (!fields.emplace(text.substr(at, digits - at), std::stoll(text.substr(digits, end - digits)))
             .second) {
      throw bad();
    }
    at = end;
  }
  const auto take = [&](const char* name) {
    const auto found = fields.find(name);
    if (found == fields.end()) return std::int64_t{-1};
    const std::int64_t value = found->second;
    fields.erase(found);
    return value;
  };
  shape.batch = take("B");
  shape.q_heads = take("H");
  shape.kv_heads = take("Hk");
  const std::int64_t n = take("N");
  shape.q_len = n >= 0 ? n : take("Nq");
  shape.k_len = n >= 0 ? n : take("Nk");
  shape.head_dim = take("D");
  const std::int64_t value_dim = take("Dv");
  shape.value_dim = value_dim >= 0 ? value_dim : shape.head_dim;
  shape.additive_dim = std::max<std::int64_t>(0, take("A"));
  shape.documents = std::max<std::int64_t>(0, take("docs"));
  shape.sliding_window = std::max<std::int64_t>(0, take("slide"));
  shape.window = take("window");
  shape.sink_tokens = std::max<std::int64_t>(0, take("sinktokens"));
  shape.page_size = std::max<std::int64_t>(0, take("page"));
  shape.ragged = ragged;
  if (shape.sink_tokens > 0 && shape.window < 0) throw bad();
  if (ragged && shape.page_size == 0) throw bad();
  if (shape.kv_heads < 0) shape.kv_heads = shape.q_heads;
  if (!fields.empty() || shape.batch < 1 || shape.q_heads < 1 || shape.q_len < 1 ||
      shape.k_len < 1 || shape.head_dim < 1 || shape.value_dim < 1 ||
      (shape.additive_dim > 0 && shape.value_dim != shape.head_dim)) {
    throw bad();
  }
  if (shape.kv_heads == 0 || shape.q_heads % shape.kv_heads != 0) {
    throw Error(fmt::format("--shapes: expected Hk dividing H in '{}'", spec));
  }
  return shape;
}

bool Shape::visible(std::int64_t i, std::int64_t j) const {
  if (causal && j > i + k_len - q_len) return false;
  if (documents > 0 && i / documents != j / documents) return false;
  if (sliding_window > 0 && (j > i || i - j > sliding_window)) return false;
  const std::int64_t diagonal = i + k_len - q_len;
  if (window >= 0 && j < diagonal - window && j >= sink_tokens) return false;
  return true;
}

double Shape::visible_share() const {
  if (!causal && documents == 0 && sliding_window == 0 && window < 0) return 1.0;
  double pairs = 0;
  for (std::int64_t i = 0; i < q_len; ++i)
    for (std::int64_t j = 0; j < k_len; ++j) pairs += visible(i, j) ? 1.0 : 0.0;
  return pairs / (static_cast<double>(q_len) * static_cast<double>(k_len));
}

std::int64_t Shape::sequence_length(std::int64_t b) const {
  if (!ragged || batch == 1) return k_len;
  return k_len / 16 + (k_len - k_len / 16) * b / (batch - 1);
}

std::int64_t Shape::total_keys() const {
  std::int64_t total = 0;
  for (std::int64_t b = 0; b < batch; ++b) total += sequence_length(b);
  return total;
}

double attention_flops(const Shape& s) {
  if (s.kv_cache()) {  // every query row of a sequence against that sequence's keys
    return 2.0 * static_cast<double>(s.q_len * s.total_keys()) *
           static_cast<double>((s.head_dim + s.value_dim) * s.q_heads);
  }
  const double pairs =
      static_cast<double>(s.q_len) * static_cast<double>(s.k_len) * s.visible_share();
  return 2.0 * pairs * static_cast<double>(s.head_dim + s.value_dim) *
         static_cast<double>(s.batch * s.q_heads);
}

double measure_read_bandwidth(int threads) {
  simd_target();  // QKV_SIMD applied: the loop reads in the vectors the kernels use
  const std::size_t words = std::size_t{512} << 17;  // 512 MiB
  const hwy::AlignedFreeUniquePtr<std::uint64_t[]> buffer =
      hwy::AllocateAligned<std::uint64_t>(words);
  std::fill(buffer.get(), buffer.get() + words, std::uint64_t{0x5555});
  // Whole 4 KiB blocks to each thread, so that each thread's part starts on a cache line.
  constexpr std::size_t kBlockWords = 512;
  const std::size_t blocks = words / kBlockWords;
  std::uint64_t total = 0;
  const double ms = median_ms(5, [&] {
    std::uint64_t folded = 0;
#pragma omp parallel num_threads(threads) reduction(^ : folded)
    {
      const auto thread = static_cast<std::size_t>(omp_get_thread_num());
      const auto count = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t first = blocks * thread / count, last = blocks * (thread + 1) / count;
      folded ^= fold_words(buffer.get() + first * kBlockWords, (last - first) * kBlockWords);
    }
    total ^= folded;
  });
  return total != 1 ? static_cast<double>(words) * 8.0 / (ms * 1e6) : 0.0;
}

double key_value_bytes(const Shape& s, DType dtype) {
  const double rows = static_cast<double>(s.total_keys() * s.kv_heads);
  // An int8 cache also reads a float32 scale per row.
  const double scale_bytes = dtype == DType::int8 ? 4.0 : 0.0;
  return rows *
         (static_cast<double>(s.head_dim + s.value_dim) * static_cast<double>(dtype_size(dtype)) +
          2.0 * scale_bytes);
}

GemmResult measure_sgemm(int threads) {
  constexpr int kSize = 2048;
  openblas_set_num_threads(threads);
  const std::vector<float> a = random_floats(kSize * kSize, 1), b = random_floats(kSize * kSize, 2);
  std::vector<float> c(kSize * kSize);
  const double ms = median_ms(5, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kSize, kSize, kSize, 1.0f, a.data(),
                kSize, b.data(), kSize, 0.0f, c.data(), kSize);
  });
  GemmResult result;
  result.gflops = 2.0 * kSize * kSize * static_cast<double>(kSize) / (ms * 1e6);
  result.kernel = openblas_get_corename();
  if (const char* coretype = std::getenv("OPENBLAS_CORETYPE")) result.coretype = coretype;
  return result;
}

std::string cpu_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::map<std::string, std::string> fields;  // the first processor's
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.empty() && !fields.empty()) break;
    const std::size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const auto trim = [](std::string text) {
      const std::size_t first = text.find_first_not_of(" \t");
      const std::size_t last = text.find_last_not_of(" \t");
      return first == std::string::npos ? std::string() : text.substr(first, last - first + 1);
    };
    fields.emplace(trim(line.substr(0, colon)), trim(line.substr(colon + 1)));
  }
  if (!fields["model name"].empty()) return fields["model name"];
  if (!fields["CPU implementer"].empty() && !fields["CPU part"].empty())
    return fmt::format("ARM implementer {}, part {}", fields["CPU implementer"],
                       fields["CPU part"]);
  return "unknown";
}

// The same values in `dtype` (float32 or bfloat16, rounded).
std::vector<std::uint16_t> as_bfloat16(const std::vector<float>& values) {
  std::vector<std::uint16_t> rounded(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) rounded[i] = to_bfloat16(values[i]);
  return rounded;
}

namespace {

// The same values as float16 (rounded).
std::vector<std::uint16_t> as_float16(const std::vector<float>& values) {
  std::vector<std::uint16_t> rounded(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) rounded[i] = to_float16(values[i]);
  return rounded;
}

// Rows of `dim` values quantized as an int8 KV cache holds them (contract §9): each row's scale
// max |x| / 127, the values round(x / scale).
void quantize_rows(const std::vector<float>& values, std::int64_t dim,
                   std::vector<std::int8_t>& quantized, std::vector<float>& scales) {
  quantized.resize(values.size());
  scales.resize(values.size() / static_cast<std::size_t>(dim));
  for (std::size_t row = 0; row < scales.size(); ++row) {
    const float* x = values.data() + row * static_cast<std::size_t>(dim);
    float largest = 0;
    for (std::int64_t d = 0; d < dim; ++d) largest = std::max(largest, std::abs(x[d]));
    scales[row] = largest / 127;
    for (std::int64_t d = 0; d < dim; ++d) {
      quantized[row * static_cast<std::size_t>(dim) + static_cast<std::size_t>(d)] =
          static_cast<std::int8_t>(largest > 0 ? std::nearbyint(x[d] / scales[row]) : 0.0f);
    }
  }
}

// One shape's inputs (seeded, so both phases see the same numbers) and the views over them.
// dtype int8: an int8 KV cache (the whole of K and V in one contiguous cache unless the shape
// pages it) with float32 queries and output.
struct BenchProblem {
  BenchProblem(const Shape& s, DType dtype, int threads) {
    const std::int64_t d = s.head_dim, dv = s.value_dim, a = s.additive_dim;
    // A KV cache: every sequence's keys in its own pages, the pool's pages handed out in a
    // shuffled order (a block table, not an offset), seqlens the sequences' lengths.
    std::int64_t rows = s.batch * s.k_len;
    if (s.kv_cache()) {
      const std::int64_t per_sequence = (s.k_len + s.page_size - 1) / s.page_size;
      std::int64_t pages = 0;
      for (std::int64_t b = 0; b < s.batch; ++b)
        pages += (s.sequence_length(b) + s.page_size - 1) / s.page_size;
      std::vector<std::int64_t> order(static_cast<std::size_t>(pages));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(10));
      block_table.assign(static_cast<std::size_t>(s.batch * per_sequence), 0);
      std::size_t next = 0;
      for (std::int64_t b = 0; b < s.batch; ++b) {
        seqlens.push_back(s.sequence_length(b));
        for (std::int64_t p = 0; p * s.page_size < s.sequence_length(b); ++p)
          block_table[static_cast<std::size_t>(b * per_sequence + p)] = order[next++];
      }
      rows = pages * s.page_size;
    }
    q = random_floats(static_cast<std::size_t>(s.batch * s.q_len * s.q_heads * d), 3);
    k = random_floats(static_cast<std::size_t>(rows * s.kv_heads * d), 4);
    v = random_floats(static_cast<std::size_t>(rows * s.kv_heads * dv), 5);
    out.resize(static_cast<std::size_t>(s.batch * s.q_len * s.q_heads * dv));
    const bool bf16 = dtype == DType::bfloat16 || dtype == DType::float16;  // 16-bit storage
    const bool int8 = dtype == DType::int8;
    const DType query_dtype = int8 ? DType::float32 : dtype;
    if (int8) {
      quantize_rows(k, d, k8, k_scales);
      quantize_rows(v, dv, v8, v_scales);
    } else if (dtype == DType::bfloat16) {
      q16 = as_bfloat16(q);
      k16 = as_bfloat16(k);
      v16 = as_bfloat16(v);
    } else if (dtype == DType::float16) {
      q16 = as_float16(q);
      k16 = as_float16(k);
      v16 = as_float16(v);
    }
    options.causal = s.causal;
    options.window_left = s.window;
    options.sink_tokens = s.sink_tokens;
    options.threads = threads;
    if (s.block_masked()) {
      const Shape shape = s;
      block_mask =
          BlockMask::from_mask_mod([&shape](std::int64_t, std::int64_t, std::int64_t i,
                                            std::int64_t j) { return shape.visible(i, j); },
                                   {1, 1, s.q_len, s.k_len, 128, 128});
      options.block_mask = &block_mask;
    }
    if (s.sigmoid) options.normalization = Normalization::sigmoid;
    if (s.sinks) {
      sinks.assign(static_cast<std::size_t>(s.q_heads), 0.5f);
      options.sinks = TensorView::contiguous(sinks.data(), DType::float32, {s.q_heads});
    }
    if (a > 0) {
      wq = random_floats(static_cast<std::size_t>(a * d), 6);
      wk = random_floats(static_cast<std::size_t>(a * d), 7);
      va = random_floats(static_cast<std::size_t>(a), 8);
      options.score = Score::additive;
      options.wq = TensorView::contiguous(wq.data(), DType::float32, {a, d});
      options.wk = TensorView::contiguous(wk.data(), DType::float32, {a, d});
      options.va = TensorView::contiguous(va.data(), DType::float32, {a});
    }
    q_view = TensorView::contiguous(bf16 ? static_cast<const void*>(q16.data()) : q.data(),
                                    query_dtype, {s.batch, s.q_len, s.q_heads, d});
    const std::array<std::int64_t, 4> kv_shape =
        s.kv_cache() ? std::array<std::int64_t, 4>{rows / s.page_size, s.page_size, s.kv_heads, d}
                     : std::array<std::int64_t, 4>{s.batch, s.k_len, s.kv_heads, d};
    const auto storage = [&](const std::vector<float>& f32, const std::vector<std::uint16_t>& b16,
                             const std::vector<std::int8_t>& i8) -> const void* {
      return int8   ? static_cast<const void*>(i8.data())
             : bf16 ? static_cast<const void*>(b16.data())
                    : static_cast<const void*>(f32.data());
    };
    k_view = TensorView::contiguous(storage(k, k16, k8), dtype, kv_shape);
    std::array<std::int64_t, 4> v_shape = kv_shape;
    v_shape[3] = dv;
    v_view = TensorView::contiguous(storage(v, v16, v8), dtype, v_shape);
    if (s.kv_cache() || int8) {  // the cache reads the same storage (the call writes nothing to it)
      cache.k = MutableTensorView::contiguous(const_cast<void*>(k_view.data), dtype, kv_shape);
      cache.v = MutableTensorView::contiguous(const_cast<void*>(v_view.data), dtype, v_shape);
      if (s.kv_cache()) {
        const std::int64_t per_sequence = (s.k_len + s.page_size - 1) / s.page_size;
        cache.block_table =
            TensorView::contiguous(block_table.data(), DType::int64, {s.batch, per_sequence});
        cache.seqlens = TensorView::contiguous(seqlens.data(), DType::int64, {s.batch});
      }
      if (int8) {
        cache.k_scale = MutableTensorView::contiguous(k_scales.data(), DType::float32,
                                                      {kv_shape[0], kv_shape[1], s.kv_heads});
        cache.v_scale = MutableTensorView::contiguous(v_scales.data(), DType::float32,
                                                      {kv_shape[0], kv_shape[1], s.kv_heads});
      }
    }
    // O in the queries' dtype (bfloat16 uses the first half of `out`).
    outputs.out =
        MutableTensorView::contiguous(out.data(), query_dtype, {s.batch, s.q_len, s.q_heads, dv});
  }
  std::vector<float> q, k, v, out, wq, wk, va, sinks, k_scales, v_scales;
  std::vector<std::uint16_t> q16, k16, v16;
  std::vector<std::int8_t> k8, v8;
  std::vector<std::int64_t> block_table, seqlens;
  KVCache cache;
  BlockMask block_mask;
  AttentionOptions options;
  TensorView q_view, k_view, v_view;
  AttentionOutputs outputs;
};

}  // namespace

double backward_flops(const Shape& shape) {
  return 2.5 * attention_flops(shape);
}

ShapeResult measure_qkv(const Shape& s, DType dtype, int threads, double bandwidth_gbs,
                        int repetitions) {
  ShapeResult result;
  result.shape = s;
  result.dtype = dtype;
  reset_peak_memory();
  BenchProblem problem(s, dtype, threads);
  result.median_ms = median_ms(repetitions, [&] {
    if (s.kv_cache() || dtype == DType::int8) {
      attention_with_kv_cache(problem.q_view, problem.cache, std::nullopt, std::nullopt, {},
                              problem.options, problem.outputs);
    } else {
      attention_forward(problem.q_view, problem.k_view, problem.v_view, problem.options,
                        problem.outputs);
    }
  });
  result.peak_mib = peak_memory_mib();
  result.gflops = attention_flops(s) / (result.median_ms * 1e6);
  result.floor_ms = key_value_bytes(s, dtype) / (bandwidth_gbs * 1e6);
  if (s.additive_dim > 0) {
    const double tanh_count =
        static_cast<double>(s.batch * s.q_heads * s.q_len * s.k_len * s.additive_dim);
    result.tanh_per_second = tanh_count / (result.median_ms * 1e-3);
  }
  return result;
}

ShapeResult measure_qkv_backward(const Shape& s, DType dtype, int threads, int repetitions) {
  if (s.kv_cache()) {
    throw Error(
        fmt::format("--pass backward: expected shapes without a KV cache (decoding has no "
                    "backward), got '{}'",
                    s.name));
  }
  ShapeResult result;
  result.shape = s;
  result.dtype = dtype;
  reset_peak_memory();
  BenchProblem problem(s, dtype, threads);
  const std::int64_t d = s.head_dim, dv = s.value_dim;
  // The forward's O and LSE (float32), kept as training keeps them; dO random.
  Tensor out(DType::float32, {s.batch, s.q_len, s.q_heads, dv});
  Tensor lse(DType::float32, {s.batch, s.q_heads, s.q_len});
  attention_forward(problem.q_view, problem.k_view, problem.v_view, problem.options,
                    {out.mutable_view(), lse.mutable_view(), {}});
  const std::vector<float> dout =
      random_floats(static_cast<std::size_t>(s.batch * s.q_len * s.q_heads * dv), 9);
  Tensor dq(dtype, {s.batch, s.q_len, s.q_heads, d}), dk(dtype, {s.batch, s.k_len, s.kv_heads, d}),
      dvalues(dtype, {s.batch, s.k_len, s.kv_heads, dv});
  AttentionGradients gradients;
  gradients.dq = dq.mutable_view();
  gradients.dk = dk.mutable_view();
  gradients.dv = dvalues.mutable_view();
  std::vector<float> dsinks(static_cast<std::size_t>(s.q_heads));
  if (s.sinks)
    gradients.dsinks = MutableTensorView::contiguous(dsinks.data(), DType::float32, {s.q_heads});
  const TensorView dout_view =
      TensorView::contiguous(dout.data(), DType::float32, {s.batch, s.q_len, s.q_heads, dv});
  result.median_ms = median_ms(repetitions, [&] {
    attention_backward(problem.q_view, problem.k_view, problem.v_view, problem.options, dout_view,
                       std::nullopt, gradients, SavedForward{out.view(), lse.view()});
  });
  result.peak_mib = peak_memory_mib();
  result.gflops = backward_flops(s) / (result.median_ms * 1e6);
  if (s.additive_dim > 0) {  // each tanh twice: once for the scores, once for their gradients
    const double tanh_count =
        2.0 * static_cast<double>(s.batch * s.q_heads * s.q_len * s.k_len * s.additive_dim);
    result.tanh_per_second = tanh_count / (result.median_ms * 1e-3);
  }
  return result;
}

void measure_baseline(ShapeResult& result, int threads, int repetitions) {
  const Shape& s = result.shape;
  if (result.dtype == DType::int8) return;  // the baseline knows no int8 cache
  BenchProblem problem(s, result.dtype, threads);
  // The baseline materializes Nq×Nk floats; past kNaiveLimitBytes it is not run.
  if (static_cast<double>(s.q_len) * static_cast<double>(s.k_len) * 4.0 > kNaiveLimitBytes ||
      !s.baseline_applies()) {
    return;
  }
  openblas_set_num_threads(threads);
  omp_set_num_threads(threads);
  std::vector<float> scores(static_cast<std::size_t>(s.q_len * s.k_len));
  if (s.additive_dim > 0) {  // run once: it takes seconds
    const auto start = std::chrono::steady_clock::now();
    naive_additive_attention(s, problem.q.data(), problem.k.data(), problem.v.data(),
                             problem.wq.data(), problem.wk.data(), problem.va.data(),
                             problem.out.data(), scores);
    result.naive_ms = milliseconds_since(start);
  } else {
    result.naive_ms = median_ms(std::max(1, repetitions / 2), [&] {
      naive_attention(s, problem.q.data(), problem.k.data(), problem.v.data(), problem.out.data(),
                      scores);
    });
  }
  result.speedup_over_naive = result.naive_ms / result.median_ms;
}

}  // namespace qkv::bench
