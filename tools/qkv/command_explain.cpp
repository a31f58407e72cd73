// qkv explain: the four steps of attention computed on a sentence and printed with their labels —
// the input rows, Q, K and V as projections, the scores (and the masked scores), the weights after
// softmax, the output rows — and one query's weighted sum written out term by term. The numbers
// come from qkv::explain_attention (the float64 reference); the last line compares them with the
// fast path. With --model, the demo's trained translator supplies the rows and projections.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "explain_page.hpp"
#include "qkv/error.hpp"
#include "qkv/explain.hpp"
#include "qkv/safetensors.hpp"
#include "qkv/staged_files.hpp"
#include "terminal_heatmap.hpp"
#include "toy_language.hpp"
#include "translation_model.hpp"

namespace qkv::cli {

namespace {

struct ExplainFlags {
  std::string sentence = "the cat sat on the mat";
  std::string score = "scaled_dot";
  std::int64_t dim = 8, heads = 1;
  bool causal = false;
  std::uint64_t seed = 1;
  std::string html, model, query;
};

constexpr std::size_t kMaxWords = 32;
constexpr std::size_t kShownColumns = 8;  // of a wide matrix in the terminal

// The demo translator's encoder self-attention with its learned embeddings, positions and
// projections.
struct Walk {
  std::vector<std::string> words;
  Tensor x;
  std::optional<MultiHeadAttention> layer;
};

std::vector<std::string> checked_words(const std::string& sentence) {
  const std::vector<std::string> words = translation::split_words(sentence);
  if (words.empty() || words.size() > kMaxWords) {
    throw Error(fmt::format("--sentence: expected 1 to {} words, got {}", kMaxWords, words.size()));
  }
  return words;
}

Walk model_walk(const ExplainFlags& flags) {
  const translation::ToyLanguage language;
  Walk walk;
  walk.words = checked_words(flags.sentence);
  const std::vector<std::int32_t> ids = language.encode_source_or_explain(walk.words, "--sentence");
  const NamedTensors state = load_safetensors(flags.model);
  // Validates every tensor of the model (names, dtypes, shapes).
  const translation::TranslationModel model = translation::TranslationModel::from_state(
      state, static_cast<std::int64_t>(language.source_words().size()),
      static_cast<std::int64_t>(language.target_words().size()));
  const translation::ModelConfig& config = model.config();
  if (static_cast<std::int64_t>(walk.words.size()) > config.max_len) {
    throw Error(fmt::format("--sentence: expected at most {} words for this model, got {}",
                            config.max_len, walk.words.size()));
  }
  MultiHeadAttentionOptions options;
  options.embed_dim = config.embed_dim;
  options.num_heads = config.self_heads;
  walk.layer.emplace(options);
  const std::string prefix = "encoder.self_attn.";
  NamedTensors attention;
  for (const auto& [name, tensor] : state)
    if (name.starts_with(prefix)) attention[name.substr(prefix.size())] = tensor;
  walk.layer->load_state_dict(attention);
  const std::int64_t e = config.embed_dim;
  walk.x = Tensor(DType::float64, {static_cast<std::int64_t>(walk.words.size()), e});
  const float* embedding = state.at("source_embedding").data<float>();
  const float* position = state.at("source_position").data<float>();
  for (std::size_t i = 0; i < walk.words.size(); ++i) {
    for (std::int64_t d = 0; d < e; ++d) {
      walk.x.data<double>()[static_cast<std::int64_t>(i) * e + d] =
          static_cast<double>(embedding[ids[i] * e + d]) +
          static_cast<double>(position[static_cast<std::int64_t>(i) * e + d]);
    }
  }
  return walk;
}

// The first `cols` (at most kShownColumns) of each of `rows` rows of `values` (row stride
// `stride`), with a note when columns were left out.
// Columns are labelled by `col_labels`, or numbered when it is empty.
std::string matrix(const double* values, std::size_t rows, std::size_t cols, std::size_t stride,
                   const std::vector<std::string>& row_labels, int precision,
                   const std::vector<std::string>& col_labels = {}) {
  const std::size_t shown = std::min(cols, kShownColumns);
  std::vector<double> cells;
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < shown; ++c) cells.push_back(values[r * stride + c]);
  std::vector<std::string> labels(
      col_labels.begin(),
      col_labels.begin() + static_cast<std::ptrdiff_t>(std::min(col_labels.size(), shown)));
  for (std::size_t c = labels.size(); c < shown; ++c) labels.push_back(std::to_string(c));
  std::string text = render_matrix(cells, row_labels, labels, precision);
  if (shown < cols) text += fmt::format("  (the first {} of {} columns)\n", shown, cols);
  return text;
}

std::size_t query_row(const ExplainFlags& flags, const std::vector<std::string>& words) {
  if (flags.query.empty()) return words.size() - 1;
  const auto found = std::find(words.begin(), words.end(), flags.query);
  if (found == words.end()) {
    throw Error(fmt::format("--query: expected a word of the sentence, got '{}'", flags.query));
  }
  return static_cast<std::size_t>(found - words.begin());
}

// `score_parameters`: a line naming the layer's score parameters and their shapes (or empty).
void print_walkthrough(const ExplainedAttention& s, const std::string& source,
                       const std::string& score_parameters, std::size_t query) {
  const std::size_t n = s.words.size();
  const auto heads = static_cast<std::size_t>(s.heads), dh = static_cast<std::size_t>(s.head_dim);
  const std::size_t e = heads * dh;
  const std::string heads_note =
      heads == 1 ? "" : fmt::format(" (features {}·h … {}·h + {} are head h's)", dh, dh, dh - 1);
  fmt::print("{}.\n{} words, {} head{} of {} features, score {}{}\n", source, n, heads,
             heads == 1 ? "" : "s", dh, score_name(s.score), s.causal ? ", causal" : "");

  fmt::print("\nThe input rows X [{}, {}]: one row of features per word\n{}", n, e,
             matrix(s.x.data<double>(), n, e, e, s.words, 3));

  fmt::print(
      "\nStep 1 — project: Q = X·Wqᵀ + bq (what each word asks), K = X·Wkᵀ + bk (what it offers\n"
      "to be found by), V = X·Wvᵀ + bv (what it carries); Wq, Wk, Wv [{}, {}] are the three "
      "blocks\n"
      "of the layer's in_proj_weight [{}, {}]{}\n",
      e, e, 3 * e, e, heads_note);
  const char* const names[] = {"Q", "K", "V"};
  const Tensor* const tensors[] = {&s.q, &s.k, &s.v};
  for (std::size_t h = 0; h < heads; ++h) {
    for (int t = 0; t < 3; ++t) {
      fmt::print("{} (head {}) [{}, {}]\n{}", names[t], h + 1, n, dh,
                 matrix(tensors[t]->data<double>() + h * dh, n, dh, e, s.words, 3));
    }
  }

  fmt::print(
      "\nStep 2 — score each query (row) against each key (column): s_ij = {}\n(the scale that "
      "multiplies each score: {:.4g}){}\n",
      score_formula(s.score), s.scale, score_parameters);
  for (std::size_t h = 0; h < heads; ++h) {
    fmt::print("scores (head {})\n{}", h + 1,
               matrix(s.scores.data<double>() + h * n * n, n, n, n, s.words, 2, s.words));
    if (s.causal) {
      fmt::print("masked (head {}): the causal mask hides key j from query i when j > i\n{}", h + 1,
                 matrix(s.masked_scores.data<double>() + h * n * n, n, n, n, s.words, 2, s.words));
    }
  }

  fmt::print(
      "\nStep 3 — softmax: P_ij = exp(s_ij) / Σ_j exp(s_ij), in percent; each row sums to 1\n");
  for (std::size_t h = 0; h < heads; ++h) {
    const double* p = s.weights.data<double>() + h * n * n;
    const std::vector<double> cells(p, p + n * n);
    fmt::print("weights (head {})\n{}", h + 1,
               render_heatmap(cells, s.words, s.words, use_color()));
    std::string sums;
    for (std::size_t i = 0; i < n; ++i) {
      double sum = 0;
      for (std::size_t j = 0; j < n; ++j) sum += p[i * n + j];
      sums += fmt::format(" {:.3f}", sum);
    }
    fmt::print("row sums:{}\n", sums);
  }

  fmt::print("\nStep 4 — average V with the weights: O_i = Σ_j P_ij · V_j\n");
  for (std::size_t h = 0; h < heads; ++h) {
    fmt::print("output (head {}) [{}, {}]\n{}", h + 1, n, dh,
               matrix(s.output.data<double>() + h * dh, n, dh, e, s.words, 3));
  }
  const std::size_t shown = std::min(dh, kShownColumns);
  std::size_t word_width = 0;
  for (const std::string& word : s.words) word_width = std::max(word_width, word.size());
  auto vector_text = [&](const Tensor& t, std::size_t row, std::size_t h) {
    std::string text = "[";
    for (std::size_t c = 0; c < shown; ++c)
      text += fmt::format("{}{:7.3f}", c == 0 ? "" : " ", t.data<double>()[row * e + h * dh + c]);
    return text + (shown < dh ? " …]" : "]");
  };
  for (std::size_t h = 0; h < heads; ++h) {
    fmt::print("\nO[{}] (head {}), term by term:\n", s.words[query], h + 1);
    bool first = true;
    for (std::size_t j = 0; j < n; ++j) {
      const double weight = s.weights.data<double>()[(h * n + query) * n + j];
      if (weight == 0) continue;  // a masked key
      fmt::print("  {} {:.3f} × V[{:<{}} {}\n", first ? " " : "+", weight, s.words[j] + "]",
                 word_width + 1, vector_text(s.v, j, h));
      first = false;
    }
    fmt::print("  = {:>{}}{}\n", "", word_width + 12, vector_text(s.output, query, h));
  }
  fmt::print(
      "\nchecked: qkv's fast path (attention_forward in float32, {}) gives the same output within "
      "{:.2g} (largest |difference| from these float64 values)\n",
      s.fast_path_target, s.fast_path_difference);
}

void run_explain(const ExplainFlags& flags) {
  if (!flags.html.empty() && !flags.html.ends_with(".html")) {
    throw Error(fmt::format("--html: expected a file name ending in .html, got '{}'", flags.html));
  }
  ExplainedAttention steps;
  std::string source;
  if (flags.model.empty()) {
    if (flags.dim < 1 || flags.dim > 64)
      throw Error(fmt::format("--dim: expected 1 to 64, got {}", flags.dim));
    if (flags.heads < 1 || flags.dim % flags.heads != 0) {
      throw Error(
          fmt::format("--heads: expected a divisor of --dim {}, got {}", flags.dim, flags.heads));
    }
    steps = explain_attention(checked_words(flags.sentence), parse_score(flags.score), flags.dim,
                              flags.heads, flags.causal, flags.seed);
    source = fmt::format(
        "Input rows: random embeddings from seed {} (a repeated word gets the same row); "
        "projections: a fresh layer's (PyTorch's initialization, no bias)",
        flags.seed);
  } else {
    const Walk walk = model_walk(flags);
    steps = explain_attention(walk.words, walk.x.view(), *walk.layer, flags.causal);
    source = fmt::format(
        "The demo translator in {}: its encoder's self-attention, input rows = the learned word "
        "embeddings + position embeddings, learned projections",
        flags.model);
  }
  const std::size_t query = query_row(flags, steps.words);
  StagedFiles files;
  if (!flags.html.empty()) {
    files.add(flags.html, [&](std::ostream& out) { out << explain_page(steps, source, query); });
  }
  std::string score_parameters;
  for (const ScoreLayerParameter& parameter :
       score_layer(steps.score, steps.heads, steps.head_dim).parameters) {
    // A fresh layer's identity W scores as scaled_dot does until it learns: say so.
    const bool identity =
        flags.model.empty() && parameter.start == ScoreLayerParameter::Start::identity;
    score_parameters += fmt::format(
        "{} {} [{}]{}", score_parameters.empty() ? "\nthe score's parameters:" : ",",
        parameter.name, fmt::join(steps.score_parameters.at(parameter.name).shape(), ", "),
        identity ? " (a fresh layer's starts at the identity)" : "");
  }
  print_walkthrough(steps, source, score_parameters, query);
  if (!flags.html.empty()) {
    files.commit();
    fmt::print("wrote {}\n", flags.html);
  }
}

}  // namespace

void add_explain_command(CLI::App& app) {
  auto flags = std::make_shared<ExplainFlags>();
  CLI::App* command = app.add_subcommand(
      "explain",
      "The four steps of attention computed on a sentence and shown: project, score, softmax, "
      "average");
  command->add_option("--sentence", flags->sentence, "the words (split at spaces)")
      ->capture_default_str();
  std::string scores;
  for (std::string_view name : score_names())
    scores += (scores.empty() ? "" : " | ") + std::string(name);
  auto* score = command->add_option("--score", flags->score, scores)->capture_default_str();
  auto* dim = command->add_option("--dim", flags->dim, "features per word (1 to 64)")
                  ->capture_default_str();
  auto* heads = command->add_option("--heads", flags->heads, "heads (a divisor of --dim)")
                    ->capture_default_str();
  command->add_flag("--causal", flags->causal, "hide later words from each word");
  auto* seed = command->add_option("--seed", flags->seed, "of the embeddings and projections")
                   ->capture_default_str();
  command->add_option("--query", flags->query,
                      "the word whose output is written out term by term (default: the last)");
  command->add_option("--html", flags->html, "also write the steps as one self-contained page");
  command
      ->add_option("--model", flags->model,
                   "the demo's translator (qkv-demo/translator.safetensors): its encoder "
                   "self-attention, on words of its language")
      ->excludes(score)
      ->excludes(dim)
      ->excludes(heads)
      ->excludes(seed);
  command->callback([flags] { run_explain(*flags); });
}

}  // namespace qkv::cli
