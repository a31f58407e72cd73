// A toy translation task built in code: English-like sentences from a small grammar, and their
// translation into a target language with French words and two word-order rules that differ from
// English — the adjective follows its noun (as in French) and the verb of a clause introduced by
// "that" goes last (as in German):
//
//   the old man says that a small dog sees the cat today
//   le homme vieux dit que un chien petit le chat aujourd'hui voit
//
// Words map one to one, so a translator has to learn the words and where each one goes: its
// attention shows the crossing where the order flips.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace qkv::translation {

// Token ids of both vocabularies: 0 is padding, 1 begins a target sentence, 2 ends one.
constexpr std::int32_t kPad = 0, kBegin = 1, kEnd = 2;

class ToyLanguage {
 public:
  ToyLanguage();

  const std::vector<std::string>& source_words() const { return source_words_; }
  const std::vector<std::string>& target_words() const { return target_words_; }

  // A sentence of the grammar: S → CLAUSE | NP SAY "that" CLAUSE, CLAUSE → NP VERB NP [ADV],
  // NP → DET [ADJ] NOUN (each option taken with probability 1/2).
  std::vector<std::string> random_sentence(std::mt19937_64& rng) const;
  // Whether `sentence` is a sentence of the grammar.
  bool parses(const std::vector<std::string>& sentence) const;
  // The reference translation of a sentence of the grammar.
  std::vector<std::string> translate(const std::vector<std::string>& sentence) const;

  // Token ids of source words; std::nullopt and the first unknown word in `unknown` if any.
  std::optional<std::vector<std::int32_t>> encode_source(const std::vector<std::string>& words,
                                                         std::string* unknown) const;
  // The same, or a qkv::Error naming `flag` and the first unknown word, listing the known ones.
  std::vector<std::int32_t> encode_source_or_explain(const std::vector<std::string>& words,
                                                     const std::string& flag) const;
  std::vector<std::int32_t> encode_target(const std::vector<std::string>& words) const;
  // Words of target ids, up to the first kEnd.
  std::vector<std::string> decode_target(const std::vector<std::int32_t>& ids) const;

 private:
  std::vector<std::string> source_words_, target_words_;
};

// A sentence pair as token ids: source words, and target words followed by kEnd.
struct Example {
  std::vector<std::string> source_text, target_text;
  std::vector<std::int32_t> source, target;
};

// `count` distinct examples that avoid every sentence in `exclude` (a held-out set stays unseen).
std::vector<Example> make_examples(const ToyLanguage& language, std::size_t count,
                                   std::mt19937_64& rng, const std::vector<Example>& exclude = {});

// Splits a sentence on spaces.
std::vector<std::string> split_words(const std::string& sentence);
std::string join_words(const std::vector<std::string>& words);

}  // namespace qkv::translation
