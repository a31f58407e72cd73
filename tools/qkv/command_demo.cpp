// qkv demo: the picture of self-attention made visible. A built-in sentence gets seeded random
// embeddings and random Q/K/V projections; for each of the four scores the demo prints the score
// matrix, the softmax weights as a shaded heatmap (every row sums to 1), the output rows, and the
// token each token looks at most. The projections are random, so the patterns are arbitrary:
// training them is what makes attention meaningful.

#include <fmt/format.h>

#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "qkv/attention.hpp"
#include "qkv/error.hpp"
#include "terminal_heatmap.hpp"

namespace qkv::cli {

namespace {

constexpr const char* kSentence = "the cat sat on the mat because it was tired";
constexpr std::int64_t kEmbedDim = 12;    // size of each token's embedding x
constexpr std::int64_t kHeadDim = 4;      // size of q, k, v
constexpr std::int64_t kAdditiveDim = 8;  // hidden size A of the additive score

struct DemoFlags {
  std::uint64_t seed = 7;
};

std::vector<std::string> split_words(const std::string& sentence) {
  std::istringstream in(sentence);
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  return words;
}

// A [rows, cols] matrix of N(0, stddev²) entries.
Tensor random_matrix(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, double stddev) {
  Tensor t(DType::float32, {rows, cols});
  std::normal_distribution<float> normal(0.0f, static_cast<float>(stddev));
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = normal(rng);
  return t;
}

// y[n, :] = W x[n, :] for W [out, in], x [N, in]: the learned projections of the seed picture.
Tensor project(const Tensor& x, const Tensor& w) {
  const std::int64_t n = x.shape()[0], in = x.shape()[1], out = w.shape()[0];
  Tensor y(DType::float32, {n, out});
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t r = 0; r < out; ++r) {
      float sum = 0.0f;
      for (std::int64_t c = 0; c < in; ++c)
        sum += w.data<float>()[r * in + c] * x.data<float>()[t * in + c];
      y.data<float>()[t * out + r] = sum;
    }
  return y;
}

const char* formula(Score score) {
  switch (score) {
    case Score::dot:
      return "s(q, k) = q·k";
    case Score::scaled_dot:
      return "s(q, k) = q·k / sqrt(d)";
    case Score::bilinear:
      return "s(q, k) = qᵀ W k          (Luong)";
    case Score::additive:
      return "s(q, k) = vᵀ tanh(Wq q + Wk k)   (Bahdanau)";
  }
  return "";
}

void run_demo(const DemoFlags& flags) {
  const std::vector<std::string> tokens = split_words(kSentence);
  const auto n = static_cast<std::int64_t>(tokens.size());
  std::mt19937_64 rng(flags.seed);
  const double embed_scale = 1.0 / std::sqrt(static_cast<double>(kEmbedDim));
  const Tensor embeddings = random_matrix(rng, n, kEmbedDim, 1.0);
  const Tensor wq = random_matrix(rng, kHeadDim, kEmbedDim, 2.0 * embed_scale);
  const Tensor wk = random_matrix(rng, kHeadDim, kEmbedDim, 2.0 * embed_scale);
  const Tensor wv = random_matrix(rng, kHeadDim, kEmbedDim, embed_scale);
  const Tensor q = project(embeddings, wq), k = project(embeddings, wk),
               v = project(embeddings, wv);
  const Tensor bilinear_w = random_matrix(rng, kHeadDim, kHeadDim, 1.0);
  const Tensor additive_wq = random_matrix(rng, kAdditiveDim, kHeadDim, 1.0);
  const Tensor additive_wk = random_matrix(rng, kAdditiveDim, kHeadDim, 1.0);
  const Tensor additive_v = random_matrix(rng, 1, kAdditiveDim, 1.0);

  const bool color = use_color();
  fmt::print("qkv demo: self-attention on one sentence (seed {})\n\n", flags.seed);
  fmt::print("  \"{}\"\n\n", kSentence);
  fmt::print(
      "Each token gets a random embedding x ({} numbers). Three projections turn it into a query\n"
      "q = Wq x (what the token asks for), a key k = Wk x (what it offers) and a value v = Wv x\n"
      "(what it carries), {} numbers each. A score compares every query with every key; softmax\n"
      "turns each row of scores into weights that sum to 1; each output row is the weighted\n"
      "average of the values. The projections here are random, so the patterns are arbitrary:\n"
      "training them is what makes them mean something.\n",
      kEmbedDim, kHeadDim);

  // One head, B = 1: the [N, D] matrices seen as [1, N, 1, D].
  const auto as_sequence = [n](const Tensor& t) {
    return TensorView::contiguous(t.raw(), DType::float32, {1, n, 1, t.shape()[1]});
  };
  for (Score score : {Score::dot, Score::scaled_dot, Score::bilinear, Score::additive}) {
    AttentionOptions options;
    options.score = score;
    if (score == Score::bilinear) options.w = bilinear_w.view();
    if (score == Score::additive) {
      options.wq = additive_wq.view();
      options.wk = additive_wk.view();
      options.va = TensorView::contiguous(additive_v.raw(), DType::float32, {kAdditiveDim});
    }
    Tensor out(DType::float32, {1, n, 1, kHeadDim}), lse(DType::float32, {1, 1, n}),
        weights(DType::float32, {1, 1, n, n});
    attention_forward(as_sequence(q), as_sequence(k), as_sequence(v), options,
                      {out.mutable_view(), lse.mutable_view(), weights.mutable_view()});

    // The scores themselves are recovered exactly from the softmax: s_ij = LSE_i + log P_ij.
    std::vector<double> scores(static_cast<std::size_t>(n * n)), probabilities(scores.size());
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        const double p = weights.data<float>()[i * n + j];
        probabilities[static_cast<std::size_t>(i * n + j)] = p;
        scores[static_cast<std::size_t>(i * n + j)] = lse.data<float>()[i] + std::log(p);
      }
    std::vector<double> outputs(out.data<float>(), out.data<float>() + n * kHeadDim);
    std::vector<std::string> dims;
    for (std::int64_t d = 0; d < kHeadDim; ++d) dims.push_back(fmt::format("o{}", d));

    fmt::print("\n== {} ==  {}\n\n", score_name(score), formula(score));
    fmt::print("scores s (row: query token, column: key token)\n{}\n",
               render_matrix(scores, tokens, tokens, 2));
    fmt::print("weights P = softmax(s) per row, in percent (every row sums to 1)\n{}\n",
               render_heatmap(probabilities, tokens, tokens, color));
    fmt::print("output O = P V (each row: a blend of the value rows)\n{}",
               render_matrix(outputs, tokens, dims, 3));
    std::string strongest;
    double worst_row_sum_error = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      std::int64_t best = 0;
      double sum = 0.0;
      for (std::int64_t j = 0; j < n; ++j) {
        sum += probabilities[static_cast<std::size_t>(i * n + j)];
        if (probabilities[static_cast<std::size_t>(i * n + j)] >
            probabilities[static_cast<std::size_t>(i * n + best)]) {
          best = j;
        }
      }
      worst_row_sum_error = std::max(worst_row_sum_error, std::abs(sum - 1.0));
      strongest += fmt::format("{}{} → {}", i == 0 ? "" : ", ", tokens[static_cast<std::size_t>(i)],
                               tokens[static_cast<std::size_t>(best)]);
    }
    fmt::print("\nlooks at most: {}\nrows of P sum to 1 within {:.1e}\n", strongest,
               worst_row_sum_error);
  }
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto flags = std::make_shared<DemoFlags>();
  CLI::App* command =
      app.add_subcommand("demo", "Self-attention on a built-in sentence, for every score");
  command->add_option("--seed", flags->seed, "seed of the embeddings and projections")
      ->default_str("7");
  command->callback([flags] { run_demo(*flags); });
}

}  // namespace qkv::cli
