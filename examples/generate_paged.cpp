// Generate text from a small decoder-only transformer for a ragged batch of prompts, with a paged
// KV cache, and check it token for token against generating without a cache — qkv's public API
// only.
//
// The model (random weights from a seed; what it says is noise, but noise that must not change):
// token embeddings, two pre-norm blocks of grouped-query attention (4 query heads, 2 key/value
// heads, head dim 16, rotary positions, GPT-NeoX style) and a ReLU MLP, and an output layer. Greedy
// decoding, 16 new tokens for each of four prompts of 3, 7, 1 and 12 tokens.
//
//   without a cache: every step runs the whole sequence through the model (attention_forward,
//                    causal, one sequence at a time), positions rotated here;
//   with the cache:  each prompt is prefilled once into its pages (attention_with_kv_cache, the
//                    cache rotating q and k), then every step feeds the four sequences' newest
//                    tokens together, each appended in place at its own length.
//
//   cmake --build build/release --target generate_paged
//   build/release/examples/generate_paged
//
// Exits non-zero if the two generations differ anywhere.

#include <qkv/attention.hpp>
#include <qkv/kv_cache.hpp>
#include <qkv/linear.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

namespace {

constexpr std::int64_t kVocab = 64, kEmbed = 64, kHeads = 4, kKvHeads = 2, kHeadDim = 16;
constexpr std::int64_t kHidden = 128, kLayers = 2, kPageSize = 16, kMaxLength = 64;

struct Block {
  qkv::Linear q{kEmbed, kHeads*kHeadDim, false, 0}, k{kEmbed, kKvHeads*kHeadDim, false, 0},
      v{kEmbed, kKvHeads*kHeadDim, false, 0}, o{kHeads * kHeadDim, kEmbed, false, 0},
      up{kEmbed, kHidden, false, 0}, down{kHidden, kEmbed, false, 0};
};

struct Model {
  std::vector<Block> blocks;
  qkv::Tensor embedding{qkv::DType::float32, {kVocab, kEmbed}};
  qkv::Linear head{kEmbed, kVocab, false, 0};
  qkv::Tensor cos{qkv::DType::float32, {kMaxLength, kHeadDim / 2}};
  qkv::Tensor sin{qkv::DType::float32, {kMaxLength, kHeadDim / 2}};

  Model() {
    std::uint64_t seed = 1;
    for (std::int64_t l = 0; l < kLayers; ++l) {
      Block block;
      for (qkv::Linear* linear : {&block.q, &block.k, &block.v, &block.o, &block.up, &block.down})
        *linear = qkv::Linear(linear->in_features(), linear->out_features(), false, ++seed);
      blocks.push_back(std::move(block));
    }
    const qkv::Linear table(kEmbed, kVocab, false, ++seed);  // embeddings: a layer's weights
    for (std::int64_t n = 0; n < embedding.numel(); ++n)
      embedding.data<float>()[n] = 4.0f * table.weight.data<float>()[n];
    head = qkv::Linear(kEmbed, kVocab, false, ++seed);
    for (std::int64_t p = 0; p < kMaxLength; ++p)
      for (std::int64_t t = 0; t < kHeadDim / 2; ++t) {
        const double angle = static_cast<double>(p) * std::pow(10000.0, -2.0 * t / kHeadDim);
        cos.data<float>()[p * kHeadDim / 2 + t] = static_cast<float>(std::cos(angle));
        sin.data<float>()[p * kHeadDim / 2 + t] = static_cast<float>(std::sin(angle));
      }
  }

  // x [n, kEmbed] rows scaled to unit root-mean-square.
  static qkv::Tensor rms_norm(const qkv::Tensor& x) {
    qkv::Tensor y = x;
    for (std::int64_t r = 0; r < x.shape()[0]; ++r) {
      float* row = y.data<float>() + r * kEmbed;
      double sum = 0;
      for (std::int64_t e = 0; e < kEmbed; ++e) sum += double{row[e]} * row[e];
      const auto scale = static_cast<float>(1.0 / std::sqrt(sum / kEmbed + 1e-6));
      for (std::int64_t e = 0; e < kEmbed; ++e) row[e] *= scale;
    }
    return y;
  }

  // Rotary embedding of rows [n, heads, kHeadDim] at positions first … first + n − 1, in double
  // as the KV cache computes it (so both generations see the very same rotated vectors).
  void rotate(qkv::Tensor& x, std::int64_t heads, std::int64_t first) const {
    const std::int64_t half = kHeadDim / 2;
    for (std::int64_t r = 0; r < x.shape()[0]; ++r)
      for (std::int64_t h = 0; h < heads; ++h) {
        float* row = x.data<float>() + (r * heads + h) * kHeadDim;
        for (std::int64_t t = 0; t < half; ++t) {
          const double c = cos.data<float>()[(first + r) * half + t];
          const double s = sin.data<float>()[(first + r) * half + t];
          const double a = row[t], b = row[t + half];
          row[t] = static_cast<float>(a * c - b * s);
          row[t + half] = static_cast<float>(a * s + b * c);
        }
      }
  }

  qkv::Tensor embed(const std::vector<std::int64_t>& tokens) const {
    qkv::Tensor x(qkv::DType::float32, {static_cast<std::int64_t>(tokens.size()), kEmbed});
    for (std::size_t r = 0; r < tokens.size(); ++r)
      std::copy_n(embedding.data<float>() + tokens[r] * kEmbed, kEmbed,
                  x.data<float>() + static_cast<std::int64_t>(r) * kEmbed);
    return x;
  }

  // The block's residual updates around an attention step that maps (q, k, v) rows to [n, Hq·d].
  template <class Attend>
  void run_block(const Block& block, qkv::Tensor& x, const Attend& attend) const {
    const qkv::Tensor h = rms_norm(x);
    const qkv::Tensor attended =
        attend(block.q.forward(h.view()), block.k.forward(h.view()), block.v.forward(h.view()));
    const qkv::Tensor o = block.o.forward(attended.view());
    for (std::int64_t n = 0; n < x.numel(); ++n) x.data<float>()[n] += o.data<float>()[n];
    qkv::Tensor hidden = block.up.forward(rms_norm(x).view());
    for (std::int64_t n = 0; n < hidden.numel(); ++n)
      hidden.data<float>()[n] = std::max(hidden.data<float>()[n], 0.0f);
    const qkv::Tensor down = block.down.forward(hidden.view());
    for (std::int64_t n = 0; n < x.numel(); ++n) x.data<float>()[n] += down.data<float>()[n];
  }

  // The greedy next token from row `row` of x, and how far ahead of the runner-up it was.
  std::pair<std::int64_t, float> next_token(const qkv::Tensor& x, std::int64_t row) const {
    const qkv::Tensor last = qkv::to_tensor(rms_norm(x).view().narrow(0, row, row + 1));
    const qkv::Tensor logits = head.forward(last.view());
    const float* l = logits.data<float>();
    const auto best = std::max_element(l, l + kVocab) - l;
    float runner_up = -INFINITY;
    for (std::int64_t t = 0; t < kVocab; ++t)
      if (t != best) runner_up = std::max(runner_up, l[t]);
    return {best, l[best] - runner_up};
  }
};

qkv::TensorView as4(const qkv::Tensor& x, std::int64_t batch, std::int64_t length,
                    std::int64_t heads) {
  return qkv::TensorView::contiguous(x.raw(), qkv::DType::float32,
                                     {batch, length, heads, kHeadDim});
}

// Without a cache: the whole sequence through the model, for each new token.
std::vector<std::int64_t> generate_recomputing(const Model& model, std::vector<std::int64_t> tokens,
                                               std::int64_t steps, float& closest) {
  for (std::int64_t step = 0; step < steps; ++step) {
    const auto length = static_cast<std::int64_t>(tokens.size());
    qkv::Tensor x = model.embed(tokens);
    for (const Block& block : model.blocks) {
      model.run_block(block, x, [&](qkv::Tensor q, qkv::Tensor k, const qkv::Tensor& v) {
        model.rotate(q, kHeads, 0);
        model.rotate(k, kKvHeads, 0);
        qkv::Tensor out(qkv::DType::float32, {length, kHeads * kHeadDim});
        qkv::AttentionOptions options;
        options.causal = true;
        qkv::attention_forward(as4(q, 1, length, kHeads), as4(k, 1, length, kKvHeads),
                               as4(v, 1, length, kKvHeads), options,
                               {qkv::MutableTensorView::contiguous(out.raw(), qkv::DType::float32,
                                                                   {1, length, kHeads, kHeadDim}),
                                {},
                                {}});
        return out;
      });
    }
    const auto [token, margin] = model.next_token(x, length - 1);
    closest = std::min(closest, margin);
    tokens.push_back(token);
  }
  return tokens;
}

// With a paged cache shared by the batch: one layer's pages per sequence, page p of sequence b at
// pool page (layer·B + b)·pages_per_sequence + p — shuffled would work too; any table does.
struct PagedCache {
  std::int64_t batch, pages_per_sequence = kMaxLength / kPageSize;
  std::vector<qkv::Tensor> k, v;  // per layer: [pool pages, kPageSize, Hk, d]
  std::vector<std::int64_t> table;
  explicit PagedCache(std::int64_t sequences) : batch(sequences) {
    for (std::int64_t l = 0; l < kLayers; ++l) {
      k.emplace_back(qkv::DType::float32, std::vector<std::int64_t>{batch * pages_per_sequence,
                                                                    kPageSize, kKvHeads, kHeadDim});
      v.emplace_back(qkv::DType::float32, std::vector<std::int64_t>{batch * pages_per_sequence,
                                                                    kPageSize, kKvHeads, kHeadDim});
    }
    for (std::int64_t b = 0; b < batch; ++b)  // pages in reverse order: a table, not an offset
      for (std::int64_t p = 0; p < pages_per_sequence; ++p)
        table.push_back((b + 1) * pages_per_sequence - 1 - p);
  }
};

// One model pass over `rows` new tokens of each of the `count` sequences starting at `first`,
// appending to their pages at `lengths`; returns the last block's output rows [count·rows, E].
qkv::Tensor cached_pass(const Model& model, PagedCache& cache, std::int64_t first,
                        std::int64_t count, std::int64_t rows, const qkv::Tensor& x_in,
                        const std::vector<std::int64_t>& lengths) {
  qkv::Tensor x = x_in;
  const qkv::TensorView table =
      qkv::TensorView::contiguous(cache.table.data() + first * cache.pages_per_sequence,
                                  qkv::DType::int64, {count, cache.pages_per_sequence});
  const qkv::TensorView seqlens =
      qkv::TensorView::contiguous(lengths.data() + first, qkv::DType::int64, {count});
  for (std::int64_t l = 0; l < kLayers; ++l) {
    model.run_block(
        model.blocks[l], x, [&](const qkv::Tensor& q, const qkv::Tensor& k, const qkv::Tensor& v) {
          qkv::KVCache kv{
              cache.k[l].mutable_view(), cache.v[l].mutable_view(), table, seqlens, {}, {}};
          qkv::RotaryEmbedding rotary{model.cos.view(), model.sin.view(), false};
          qkv::AttentionOptions options;
          options.causal = true;
          qkv::Tensor out(qkv::DType::float32, {count * rows, kHeads * kHeadDim});
          qkv::attention_with_kv_cache(
              as4(q, count, rows, kHeads), kv, as4(k, count, rows, kKvHeads),
              as4(v, count, rows, kKvHeads), rotary, options,
              {qkv::MutableTensorView::contiguous(out.raw(), qkv::DType::float32,
                                                  {count, rows, kHeads, kHeadDim}),
               {},
               {}});
          return out;
        });
  }
  return x;
}

std::vector<std::vector<std::int64_t>> generate_cached(
    const Model& model, std::vector<std::vector<std::int64_t>> prompts, std::int64_t steps) {
  const auto batch = static_cast<std::int64_t>(prompts.size());
  PagedCache cache(batch);
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), 0);
  // Prefill: each prompt alone (their lengths differ), into its own pages.
  for (std::int64_t b = 0; b < batch; ++b) {
    auto& prompt = prompts[static_cast<std::size_t>(b)];
    const auto rows = static_cast<std::int64_t>(prompt.size());
    const qkv::Tensor x = cached_pass(model, cache, b, 1, rows, model.embed(prompt), lengths);
    lengths[static_cast<std::size_t>(b)] = rows;
    prompt.push_back(model.next_token(x, rows - 1).first);
  }
  // Decode: the newest token of every sequence in one call per layer, each at its own length.
  for (std::int64_t step = 1; step < steps; ++step) {
    std::vector<std::int64_t> newest;
    for (const auto& sequence : prompts) newest.push_back(sequence.back());
    const qkv::Tensor x = cached_pass(model, cache, 0, batch, 1, model.embed(newest), lengths);
    for (std::int64_t b = 0; b < batch; ++b) {
      ++lengths[static_cast<std::size_t>(b)];
      prompts[static_cast<std::size_t>(b)].push_back(model.next_token(x, b).first);
    }
  }
  return prompts;
}

}  // namespace

int main() {
  const Model model;
  const std::vector<std::vector<std::int64_t>> prompts = {
      {5, 9, 2}, {1, 2, 3, 4, 5, 6, 7}, {42}, {7, 7, 7, 8, 9, 10, 11, 30, 31, 32, 33, 1}};
  constexpr std::int64_t kSteps = 16;
  float closest = INFINITY;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<std::int64_t>> recomputed;
  for (const auto& prompt : prompts)
    recomputed.push_back(generate_recomputing(model, prompt, kSteps, closest));
  const auto t1 = std::chrono::steady_clock::now();
  const auto cached = generate_cached(model, prompts, kSteps);
  const auto t2 = std::chrono::steady_clock::now();

  int differences = 0;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    std::printf("sequence %zu (prompt of %zu):", b, prompts[b].size());
    for (std::size_t t = prompts[b].size(); t < cached[b].size(); ++t) {
      const bool same = cached[b][t] == recomputed[b][t];
      differences += same ? 0 : 1;
      std::printf(same ? " %lld" : " %lld≠%lld", static_cast<long long>(cached[b][t]),
                  static_cast<long long>(recomputed[b][t]));
    }
    std::printf("\n");
  }
  const auto ms = [](auto a, auto b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  std::printf(
      "%lld tokens: recomputing %.1f ms, paged cache %.1f ms; closest greedy choice "
      "%.3g logits ahead; %d differences\n",
      static_cast<long long>(kSteps * static_cast<std::int64_t>(prompts.size())), ms(t0, t1),
      ms(t1, t2), static_cast<double>(closest), differences);
  return differences == 0 ? 0 : 1;
}
