// The demo's translation task and model: the toy grammar and its reordering, the whole model's
// gradients against finite differences, a short training run that must bring the loss down, and
// saving and loading.

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "qkv/error.hpp"
#include "toy_language.hpp"
#include "translation_model.hpp"

namespace qkv::translation {
namespace {

TEST(ToyLanguage, ReordersAdjectivesAndSubordinateVerbs) {
  const ToyLanguage language;
  EXPECT_EQ(join_words(language.translate(split_words("the black cat sees a dog"))),
            "le chat noir voit un chien");
  EXPECT_EQ(
      join_words(language.translate(split_words("a man says that the old dog hears a bird today"))),
      "un homme dit que le chien vieux un oiseau aujourd'hui entend");
  EXPECT_TRUE(language.parses(split_words("the cat sees the dog")));
  EXPECT_TRUE(language.parses(split_words("a king thinks that the cat finds a big horse again")));
  EXPECT_FALSE(language.parses(split_words("the cat sees")));
  EXPECT_FALSE(language.parses(split_words("the cat often sees the dog")));
  std::string unknown;
  EXPECT_FALSE(language.encode_source(split_words("the zebra sees a cat"), &unknown));
  EXPECT_EQ(unknown, "zebra");
}

TEST(ToyLanguage, HeldOutSentencesAreNeverTrainedOn) {
  const ToyLanguage language;
  std::mt19937_64 rng(3);
  const std::vector<Example> test = make_examples(language, 200, rng);
  const std::vector<Example> training = make_examples(language, 2000, rng, test);
  std::set<std::vector<std::string>> seen;
  for (const Example& e : training) seen.insert(e.source_text);
  EXPECT_EQ(seen.size(), training.size());
  for (const Example& e : test) {
    EXPECT_FALSE(seen.count(e.source_text)) << join_words(e.source_text);
    EXPECT_TRUE(language.parses(e.source_text));
    EXPECT_EQ(e.target.back(), kEnd);
  }
}

std::vector<const Example*> pointers(const std::vector<Example>& examples) {
  std::vector<const Example*> out;
  for (const Example& e : examples) out.push_back(&e);
  return out;
}

// Every parameter tensor of the whole model (embeddings, the three attention layers with their
// score parameters, the feed-forward layers, the output layer): a few entries each, the analytic
// gradient against a central difference of the float32 loss.
class WholeModelGradients : public ::testing::TestWithParam<Score> {};

TEST_P(WholeModelGradients, MatchFiniteDifferences) {
  const ToyLanguage language;
  std::mt19937_64 rng(5);
  const std::vector<Example> examples = make_examples(language, 3, rng);
  const Batch batch = make_batch(pointers(examples));
  ModelConfig config;
  config.embed_dim = 8;
  config.self_heads = 2;
  config.ffn_dim = 12;
  config.score = GetParam();
  const auto vocab = static_cast<std::int64_t>(language.source_words().size());
  TranslationModel model(config, vocab, vocab, 9);
  model.zero_grad();
  model.forward(batch);
  model.backward();
  int checked = 0;
  std::mt19937_64 pick(17);
  for (const auto& parameter : model.parameters()) {
    const Tensor analytic = *parameter.gradient;  // a copy: the loss is re-run below
    for (int n = 0; n < 4; ++n) {
      const auto at =
          static_cast<std::int64_t>(pick() % static_cast<std::uint64_t>(analytic.numel()));
      float& value = parameter.value->data<float>()[at];
      const float saved = value;
      const auto central = [&](float step) {
        value = saved + step;
        const double plus = model.forward(batch);
        value = saved - step;
        const double minus = model.forward(batch);
        value = saved;
        return (plus - minus) / (2.0 * static_cast<double>(step));
      };
      // float32 losses near 3.7 are good to ~5e-7, so the difference quotient to ~2e-4.
      const double numeric = central(2e-3f);
      const auto tolerance = [](double reference) { return 6e-4 + 3e-2 * std::abs(reference); };
      const double exact = analytic.data<float>()[at];
      EXPECT_NEAR(exact, numeric, tolerance(numeric)) << parameter.name << "[" << at << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 4 * 25);  // every parameter tensor was visited
}

INSTANTIATE_TEST_SUITE_P(Scores, WholeModelGradients,
                         ::testing::Values(Score::scaled_dot, Score::additive),
                         [](const auto& score) {
                           return score.param == Score::additive ? "additive" : "scaled_dot";
                         });

// A reduced task (800 sentences, 150 steps of 32, a smaller model): the loss must fall from
// ln(41) ≈ 3.7 to below 0.4, a bound set from the measured run (0.25 scaled_dot, 0.21 additive at
// these seeds) with a margin for other BLAS builds.
TEST(Training, LossFallsOnAReducedTask) {
  const ToyLanguage language;
  std::mt19937_64 rng(1);
  const std::vector<Example> examples = make_examples(language, 800, rng);
  for (const Score score : {Score::scaled_dot, Score::additive}) {
    ModelConfig config;
    config.embed_dim = 32;
    config.ffn_dim = 64;
    config.score = score;
    const auto vocab = static_cast<std::int64_t>(language.source_words().size());
    TranslationModel model(config, vocab, vocab, 1);
    Adam adam(model.parameters(), 0.0);
    double first = 0, last = 0;
    for (int step = 0; step < 150; ++step) {
      std::vector<const Example*> batch;
      for (int n = 0; n < 32; ++n)
        batch.push_back(&examples[static_cast<std::size_t>((step * 32 + n) % 800)]);
      model.zero_grad();
      const double loss = model.forward(make_batch(batch));
      model.backward();
      adam.step(3e-3 * std::min(1.0, (step + 1) / 20.0));
      if (step == 0) first = loss;
      last = loss;
    }
    EXPECT_NEAR(first, std::log(41.0), 0.5);
    EXPECT_LT(last, 0.4) << (score == Score::additive ? "additive" : "scaled_dot");
  }
}

TEST(Model, SavesAndLoadsItsState) {
  const ToyLanguage language;
  std::mt19937_64 rng(2);
  const std::vector<Example> examples = make_examples(language, 4, rng);
  ModelConfig config;
  config.embed_dim = 16;
  config.ffn_dim = 16;
  config.score = Score::additive;
  const auto vocab = static_cast<std::int64_t>(language.source_words().size());
  TranslationModel model(config, vocab, vocab, 4);
  NamedTensors state = model.state();
  TranslationModel loaded = TranslationModel::from_state(state, vocab, vocab);
  EXPECT_EQ(loaded.config().score, Score::additive);
  const Batch batch = make_batch(pointers(examples));
  EXPECT_EQ(model.forward(batch), loaded.forward(batch));
  std::vector<std::vector<std::int32_t>> sources{examples[0].source, examples[1].source};
  const auto a = model.translate(sources), b = loaded.translate(sources);
  EXPECT_EQ(a[0].ids, b[0].ids);
  EXPECT_EQ(a[1].alignment, b[1].alignment);
  state.erase("decoder.cross_attn.score_v");
  EXPECT_THROW(TranslationModel::from_state(state, vocab, vocab), Error);
  NamedTensors none;
  EXPECT_THROW(TranslationModel::from_state(none, vocab, vocab), Error);
}

// Decoding with caches (the decoder's self-attention appending to a KV cache, the encoder's keys
// and values projected once) gives the translations of decoding without them, word for word, and
// the same alignments — untrained models, whose greedy words run to the longest sentence.
TEST(Model, DecodingWithACacheTranslatesAlike) {
  const ToyLanguage language;
  std::mt19937_64 rng(5);
  const std::vector<Example> examples = make_examples(language, 6, rng);
  const auto vocab = static_cast<std::int64_t>(language.source_words().size());
  std::vector<std::vector<std::int32_t>> sources;
  for (const Example& e : examples) sources.push_back(e.source);
  for (const Score score : {Score::scaled_dot, Score::additive}) {
    ModelConfig config;
    config.score = score;
    TranslationModel model(config, vocab, vocab, 9);
    const auto recomputed = model.translate(sources), cached = model.translate_cached(sources);
    std::size_t words = 0;
    for (std::size_t n = 0; n < sources.size(); ++n) {
      EXPECT_EQ(cached[n].ids, recomputed[n].ids) << score_name(score) << " sentence " << n;
      ASSERT_EQ(cached[n].alignment.size(), recomputed[n].alignment.size());
      for (std::size_t i = 0; i < cached[n].alignment.size(); ++i)
        EXPECT_NEAR(cached[n].alignment[i], recomputed[n].alignment[i], 1e-5);
      words += cached[n].ids.size();
    }
    EXPECT_GT(words, 3 * sources.size());  // more than a word or two each
  }
}

}  // namespace
}  // namespace qkv::translation
