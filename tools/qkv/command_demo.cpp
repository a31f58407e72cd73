// qkv demo: attention learns to translate. A toy English → French-with-German-word-order task is
// built in code (tools/translation/toy_language.hpp); a small encoder–decoder with attention is
// trained on it with qkv's own forward and backward and Adam; the demo then reports held-out
// accuracy, translates a few sentences and draws the cross-attention alignment of one — where the
// adjective follows its noun and the verb moves to the end, the picture's diagonal crosses over.

#include <cblas.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "commands.hpp"
#include "heatmap_image.hpp"
#include "qkv/error.hpp"
#include "qkv/safetensors.hpp"
#include "terminal_heatmap.hpp"
#include "translation_model.hpp"

namespace qkv::cli {

namespace {

using namespace qkv::translation;

struct DemoFlags {
  std::uint64_t seed = 1;
  std::string score = "scaled_dot";
  int steps = 400;
  std::string output_dir = "qkv-demo";
  std::string load, translate;
};

constexpr std::size_t kTrainSentences = 8000, kTestSentences = 500, kBatch = 64;
constexpr const char* kShowcase = "the old farmer says that a young dog sees the red bird today";

// A bar that redraws itself on a terminal, and prints a line a quarter of the way otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(int total) : total_(total), terminal_(isatty(STDOUT_FILENO) != 0) {}
  void show(int done, double loss, double tokens_per_second) {
    const int width = 30;
    const int filled = width * done / total_;
    std::string bar;
    for (int i = 0; i < width; ++i) bar += i < filled ? "█" : "░";
    const std::string line =
        fmt::format("training [{}] {:3d}%  step {}/{}  loss {:.3f}  {:.1f}k tokens/s", bar,
                    100 * done / total_, done, total_, loss, tokens_per_second / 1000);
    if (terminal_) {
      fmt::print("\r{}", line);
      if (done == total_) fmt::print("\n");
      std::fflush(stdout);
    } else if (done == total_ || done * 4 / total_ != (done - 1) * 4 / total_) {
      fmt::print("{}\n", line);
    }
  }

 private:
  int total_;
  bool terminal_;
};

TranslationModel train(const ToyLanguage& language, const std::vector<Example>& training,
                       const DemoFlags& flags) {
  ModelConfig config;
  config.score = parse_score(flags.score);
  TranslationModel model(config, static_cast<std::int64_t>(language.source_words().size()),
                         static_cast<std::int64_t>(language.target_words().size()), flags.seed);
  Adam adam(model.parameters(), 0.0);
  std::mt19937_64 rng(flags.seed + 1);
  std::vector<std::size_t> order(training.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  ProgressBar progress(flags.steps);
  const auto start = std::chrono::steady_clock::now();
  double tokens = 0, smoothed = 0;
  std::size_t at = order.size();
  for (int step = 1; step <= flags.steps; ++step) {
    std::vector<const Example*> batch;
    while (batch.size() < kBatch) {
      if (at == order.size()) {
        std::shuffle(order.begin(), order.end(), rng);
        at = 0;
      }
      batch.push_back(&training[order[at++]]);
    }
    const Batch b = make_batch(batch);
    model.zero_grad();
    const double loss = model.forward(b);
    model.backward();
    // Warm up for 100 steps, then decay linearly to a tenth.
    const double peak = 3e-3, warm = std::min(1.0, step / 100.0);
    const double decay = 1.0 - 0.9 * std::max(0, step - 100) / std::max(1, flags.steps - 100);
    adam.step(peak * warm * decay);
    tokens += static_cast<double>(b.target_tokens);
    smoothed = step == 1 ? loss : 0.95 * smoothed + 0.05 * loss;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    progress.show(step, smoothed, tokens / std::max(seconds, 1e-9));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("trained {} steps of {} sentences in {:.1f} s\n", flags.steps, kBatch, seconds);
  return model;
}

// Held-out exact-sentence accuracy.
double accuracy(TranslationModel& model, const ToyLanguage& language,
                const std::vector<Example>& test) {
  std::vector<std::vector<std::int32_t>> sources;
  for (const Example& e : test) sources.push_back(e.source);
  const std::vector<Translation> out = model.translate(sources);
  std::size_t right = 0;
  for (std::size_t n = 0; n < test.size(); ++n)
    right += language.decode_target(out[n].ids) == test[n].target_text ? 1 : 0;
  return static_cast<double>(right) / static_cast<double>(test.size());
}

// Greedy decoding of the held-out sentences twice: recomputing the decoder over every word so far
// at each step, and with KV caches (one new word per step). Prints both rates and whether the
// translations agree word for word.
void compare_decoders(TranslationModel& model, const std::vector<Example>& test) {
  std::vector<std::vector<std::int32_t>> sources;
  for (const Example& e : test) sources.push_back(e.source);
  const auto time = [&](auto decode) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<Translation> out = decode(sources);
    return std::pair{
        std::move(out),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
  };
  const auto [recomputed, recompute_seconds] =
      time([&](const auto& s) { return model.translate(s); });
  const auto [cached, cached_seconds] =
      time([&](const auto& s) { return model.translate_cached(s); });
  std::size_t words = 0, same = 0;
  for (std::size_t n = 0; n < sources.size(); ++n) {
    words += cached[n].ids.size();
    same += cached[n].ids == recomputed[n].ids ? 1 : 0;
  }
  const auto rate = [&](double seconds) {
    return static_cast<double>(words) / std::max(seconds, 1e-9);
  };
  fmt::print(
      "greedy decoding of those {} sentences ({} words): {:.0f} words/s recomputing, "
      "{:.0f} words/s with KV caches ({:.1f}×); {} of {} translations identical\n",
      sources.size(), words, rate(recompute_seconds), rate(cached_seconds),
      recompute_seconds / std::max(cached_seconds, 1e-9), same, sources.size());
}

// The words of `sentence`, or a qkv::Error naming the first unknown one.
std::vector<std::int32_t> encode_or_explain(const ToyLanguage& language,
                                            const std::vector<std::string>& words) {
  std::vector<std::int32_t> ids = language.encode_source_or_explain(words, "--translate");
  if (words.empty() || static_cast<std::int64_t>(words.size()) > ModelConfig{}.max_len - 1) {
    throw Error(fmt::format("--translate: expected 1 to {} words, got {}",
                            ModelConfig{}.max_len - 1, words.size()));
  }
  return ids;
}

// Prints a translation with its alignment, and writes the alignment as PNG and SVG (staged).
void show_alignment(TranslationModel& model, const ToyLanguage& language,
                    const std::vector<std::string>& words, StagedFiles* files,
                    const std::string& directory) {
  const Translation t = model.translate({encode_or_explain(language, words)})[0];
  std::vector<std::string> produced = language.decode_target(t.ids);
  std::vector<std::string> rows = produced;
  if (rows.size() < t.ids.size()) rows.push_back("</s>");
  fmt::print("\n  {}\n→ {}\n", join_words(words), join_words(produced));
  if (language.parses(words)) {
    const std::vector<std::string> reference = language.translate(words);
    fmt::print("  {}\n", reference == produced
                             ? "(the grammar's own translation: the same)"
                             : "(the grammar's own translation: " + join_words(reference) + ")");
  } else {
    fmt::print(
        "  (not a sentence of the demo's grammar — NP VERB NP [ADV], or NP SAYS that "
        "NP VERB NP [ADV] — so the model is guessing)\n");
  }
  const HeatmapPanel panel{t.alignment, rows, words, ""};
  fmt::print(
      "\ncross-attention: each output word (row) and the input words it looked at "
      "(columns), in percent\n{}",
      render_heatmap(panel.values, panel.row_labels, panel.col_labels, use_color()));
  if (files != nullptr) {
    const std::string caption =
        fmt::format("qkv demo: where each French word looks ({} score)",
                    model.config().score == Score::additive ? "additive" : "scaled-dot");
    for (const char* extension : {".png", ".svg"}) {
      const std::string path =
          (std::filesystem::path(directory) / "alignment").string() + extension;
      add_heatmap(*files, path, "--output-dir", {panel}, caption);
      fmt::print("wrote {}\n", path);
    }
  }
}

void run_demo(const DemoFlags& flags) {
  if (flags.steps < 1) throw Error(fmt::format("--steps: expected >= 1, got {}", flags.steps));
  // The model's matrices are tiny (64 sentences × 64 features): one BLAS thread is faster than
  // two that wait for each other, and qkv's own kernels still use every core.
  openblas_set_num_threads(1);
  const ToyLanguage language;
  const auto source_vocab = static_cast<std::int64_t>(language.source_words().size());
  const auto target_vocab = static_cast<std::int64_t>(language.target_words().size());
  const std::filesystem::path directory(flags.output_dir);
  const std::string model_path = (directory / "translator.safetensors").string();

  // A typed sentence with a saved model: no training.
  std::string load = flags.load;
  if (load.empty() && !flags.translate.empty() && std::filesystem::exists(model_path))
    load = model_path;
  std::optional<TranslationModel> model;
  if (!load.empty()) {
    model.emplace(TranslationModel::from_state(load_safetensors(load), source_vocab, target_vocab));
    fmt::print("loaded {}\n", load);
  }
  if (!flags.translate.empty()) {
    if (!model) fmt::print("no saved model in {}: training one first\n", flags.output_dir);
    const std::vector<std::string> words = split_words(flags.translate);
    encode_or_explain(language, words);  // an unknown word stops here, before any training
    if (!model) {
      std::mt19937_64 rng(flags.seed);
      model.emplace(train(language, make_examples(language, kTrainSentences, rng), flags));
    }
    show_alignment(*model, language, words, nullptr, "");
    return;
  }

  std::error_code error;  // before any training: a bad folder fails fast
  std::filesystem::create_directories(directory, error);
  if (error) {
    throw Error(fmt::format("--output-dir: expected a folder that can be created, got '{}' ({})",
                            flags.output_dir, error.message()));
  }
  fmt::print(
      "qkv demo: attention learns to translate.\n"
      "A toy language pair built in code: English words → French words, with the adjective after "
      "its noun\n(as in French) and the verb of a 'that' clause at the end (as in German). "
      "{} source and {} target words.\n",
      source_vocab - 3, target_vocab - 3);
  std::mt19937_64 rng(flags.seed);
  const std::vector<Example> test = make_examples(language, kTestSentences, rng);
  const std::vector<Example> training = make_examples(language, kTrainSentences, rng, test);
  fmt::print("for example:  {}\n          →   {}\n\n", join_words(training[0].source_text),
             join_words(training[0].target_text));
  if (!model) {
    fmt::print(
        "an encoder–decoder with attention (embeddings {}, {} cross-attention score), "
        "{} training sentences, {} held out\n",
        ModelConfig{}.embed_dim, flags.score, kTrainSentences, kTestSentences);
    model.emplace(train(language, training, flags));
  }
  const double correct = accuracy(*model, language, test);
  fmt::print("\nheld-out exact-sentence accuracy: {:.1f}% of {} sentences never seen in training\n",
             100 * correct, kTestSentences);
  compare_decoders(*model, test);
  fmt::print("\nsome held-out sentences:\n");
  std::vector<std::vector<std::int32_t>> sources;
  for (std::size_t n = 0; n < 5; ++n) sources.push_back(test[n].source);
  const std::vector<Translation> out = model->translate(sources);
  for (std::size_t n = 0; n < sources.size(); ++n) {
    const std::vector<std::string> words = language.decode_target(out[n].ids);
    fmt::print("  {}\n→ {}  {}\n", join_words(test[n].source_text), join_words(words),
               words == test[n].target_text
                   ? "✓"
                   : "✗ (expected " + join_words(test[n].target_text) + ")");
  }
  StagedFiles files;
  show_alignment(*model, language, split_words(kShowcase), &files, flags.output_dir);
  if (flags.load.empty()) {
    add_safetensors(files, model_path, model->state());
    fmt::print(
        "saved the model to {} (qkv demo --load {} reuses it; --translate \"…\" "
        "translates your sentence)\n",
        model_path, model_path);
  }
  files.commit();
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto flags = std::make_shared<DemoFlags>();
  CLI::App* command = app.add_subcommand(
      "demo", "Train attention to translate a toy language, and see where it looks");
  command->add_option("--seed", flags->seed, "seed of the data, the model and the batches");
  command->add_option("--score", flags->score,
                      "cross-attention score: scaled_dot (Transformer) or additive (Bahdanau)");
  command->add_option("--steps", flags->steps, "training steps (batches of 64 sentences)");
  command->add_option("--output-dir", flags->output_dir,
                      "where the model and the alignment pictures go");
  command->add_option("--load", flags->load, "a model saved by the demo: no training");
  command->add_option("--translate", flags->translate,
                      "translate this sentence and show where "
                      "attention looks");
  command->callback([flags] { run_demo(*flags); });
}

}  // namespace qkv::cli
