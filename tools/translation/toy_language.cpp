#include "toy_language.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "qkv/error.hpp"

namespace qkv::translation {

namespace {

using Lexicon = std::vector<std::pair<const char*, const char*>>;  // (source, target)

const Lexicon kDeterminers{{"the", "le"}, {"a", "un"}};
const Lexicon kAdjectives{{"small", "petit"},   {"big", "grand"},    {"red", "rouge"},
                          {"black", "noir"},    {"old", "vieux"},    {"young", "jeune"},
                          {"happy", "heureux"}, {"tired", "fatigué"}};
const Lexicon kNouns{{"cat", "chat"},           {"dog", "chien"},    {"bird", "oiseau"},
                     {"man", "homme"},          {"woman", "femme"},  {"child", "enfant"},
                     {"teacher", "professeur"}, {"horse", "cheval"}, {"friend", "ami"},
                     {"farmer", "fermier"},     {"king", "roi"},     {"baker", "boulanger"}};
const Lexicon kVerbs{{"sees", "voit"},    {"likes", "aime"},     {"follows", "suit"},
                     {"finds", "trouve"}, {"calls", "appelle"},  {"helps", "aide"},
                     {"hears", "entend"}, {"watches", "regarde"}};
const Lexicon kSayVerbs{{"says", "dit"}, {"thinks", "pense"}, {"knows", "sait"}};
const Lexicon kAdverbs{
    {"today", "aujourd'hui"}, {"often", "souvent"}, {"quickly", "vite"}, {"again", "encore"}};
const Lexicon kThat{{"that", "que"}};

const std::vector<const Lexicon*>& lexicons() {
  static const std::vector<const Lexicon*> all{&kDeterminers, &kAdjectives, &kNouns, &kVerbs,
                                               &kSayVerbs,    &kAdverbs,    &kThat};
  return all;
}

bool in(const Lexicon& lexicon, const std::string& word) {
  return std::any_of(lexicon.begin(), lexicon.end(),
                     [&](const auto& entry) { return word == entry.first; });
}

std::string target_of(const std::string& word) {
  for (const Lexicon* lexicon : lexicons())
    for (const auto& [source, target] : *lexicon)
      if (word == source) return target;
  return word;
}

const char* pick(const Lexicon& lexicon, std::mt19937_64& rng) {
  return lexicon[std::uniform_int_distribution<std::size_t>(0, lexicon.size() - 1)(rng)].first;
}

bool coin(std::mt19937_64& rng) {
  return std::uniform_int_distribution<int>(0, 1)(rng) == 1;
}

void noun_phrase(std::vector<std::string>& words, std::mt19937_64& rng) {
  words.push_back(pick(kDeterminers, rng));
  if (coin(rng)) words.push_back(pick(kAdjectives, rng));
  words.push_back(pick(kNouns, rng));
}

void clause(std::vector<std::string>& words, std::mt19937_64& rng) {
  noun_phrase(words, rng);
  words.push_back(pick(kVerbs, rng));
  noun_phrase(words, rng);
  if (coin(rng)) words.push_back(pick(kAdverbs, rng));
}

// Translates the words [begin, end) of one clause (NP VERB NP [ADV]), verb last if subordinate.
void translate_clause(const std::vector<std::string>& s, std::size_t begin, std::size_t end,
                      bool verb_last, std::vector<std::string>& out) {
  std::string verb;
  std::vector<std::string> words;
  for (std::size_t i = begin; i < end; ++i) {
    if (in(kAdjectives, s[i]) && i + 1 < end && in(kNouns, s[i + 1])) {  // ADJ NOUN → NOUN ADJ
      words.push_back(target_of(s[i + 1]));
      words.push_back(target_of(s[i]));
      ++i;
    } else if (verb_last && in(kVerbs, s[i])) {
      verb = target_of(s[i]);
    } else {
      words.push_back(target_of(s[i]));
    }
  }
  if (!verb.empty()) words.push_back(verb);
  out.insert(out.end(), words.begin(), words.end());
}

// Recognizers: each consumes its phrase from `at` and says whether it could.
bool noun_phrase_at(const std::vector<std::string>& s, std::size_t& at) {
  if (at >= s.size() || !in(kDeterminers, s[at])) return false;
  ++at;
  if (at < s.size() && in(kAdjectives, s[at])) ++at;
  if (at >= s.size() || !in(kNouns, s[at])) return false;
  ++at;
  return true;
}

bool clause_at(const std::vector<std::string>& s, std::size_t& at) {
  if (!noun_phrase_at(s, at) || at >= s.size() || !in(kVerbs, s[at])) return false;
  ++at;
  if (!noun_phrase_at(s, at)) return false;
  if (at < s.size() && in(kAdverbs, s[at])) ++at;
  return true;
}

}  // namespace

bool ToyLanguage::parses(const std::vector<std::string>& sentence) const {
  std::size_t at = 0;
  if (clause_at(sentence, at) && at == sentence.size()) return true;
  at = 0;
  if (!noun_phrase_at(sentence, at) || at + 2 > sentence.size() || !in(kSayVerbs, sentence[at]) ||
      sentence[at + 1] != "that")
    return false;
  at += 2;
  return clause_at(sentence, at) && at == sentence.size();
}

ToyLanguage::ToyLanguage() {
  source_words_ = {"<pad>", "<s>", "</s>"};
  target_words_ = source_words_;
  for (const Lexicon* lexicon : lexicons()) {
    for (const auto& [source, target] : *lexicon) {
      source_words_.emplace_back(source);
      target_words_.emplace_back(target);
    }
  }
}

std::vector<std::string> ToyLanguage::random_sentence(std::mt19937_64& rng) const {
  std::vector<std::string> words;
  if (coin(rng)) {
    noun_phrase(words, rng);
    words.push_back(pick(kSayVerbs, rng));
    words.push_back("that");
  }
  clause(words, rng);
  return words;
}

std::vector<std::string> ToyLanguage::translate(const std::vector<std::string>& sentence) const {
  std::vector<std::string> out;
  const auto that = std::find(sentence.begin(), sentence.end(), "that");
  if (that == sentence.end()) {
    translate_clause(sentence, 0, sentence.size(), false, out);
  } else {  // NP SAY que, then the subordinate clause with its verb last
    const auto split = static_cast<std::size_t>(that - sentence.begin());
    translate_clause(sentence, 0, split + 1, false, out);
    translate_clause(sentence, split + 1, sentence.size(), true, out);
  }
  return out;
}

std::optional<std::vector<std::int32_t>> ToyLanguage::encode_source(
    const std::vector<std::string>& words, std::string* unknown) const {
  std::vector<std::int32_t> ids;
  for (const auto& word : words) {
    const auto at = std::find(source_words_.begin() + 3, source_words_.end(), word);
    if (at == source_words_.end()) {
      if (unknown != nullptr) *unknown = word;
      return std::nullopt;
    }
    ids.push_back(static_cast<std::int32_t>(at - source_words_.begin()));
  }
  return ids;
}

std::vector<std::int32_t> ToyLanguage::encode_source_or_explain(
    const std::vector<std::string>& words, const std::string& flag) const {
  std::string unknown;
  if (auto ids = encode_source(words, &unknown)) return *ids;
  std::string known;
  for (std::size_t w = 3; w < source_words_.size(); ++w)
    known += (known.empty() ? "" : " ") + source_words_[w];
  throw Error(fmt::format("{}: expected words of the demo's language, got '{}' (it knows: {})",
                          flag, unknown, known));
}

std::vector<std::int32_t> ToyLanguage::encode_target(const std::vector<std::string>& words) const {
  std::vector<std::int32_t> ids;
  for (const auto& word : words) {
    const auto at = std::find(target_words_.begin() + 3, target_words_.end(), word);
    ids.push_back(static_cast<std::int32_t>(at - target_words_.begin()));
  }
  return ids;
}

std::vector<std::string> ToyLanguage::decode_target(const std::vector<std::int32_t>& ids) const {
  std::vector<std::string> words;
  for (const std::int32_t id : ids) {
    if (id == kEnd) break;
    if (id > kEnd && id < static_cast<std::int32_t>(target_words_.size()))
      words.push_back(target_words_[static_cast<std::size_t>(id)]);
  }
  return words;
}

std::vector<Example> make_examples(const ToyLanguage& language, std::size_t count,
                                   std::mt19937_64& rng, const std::vector<Example>& exclude) {
  std::set<std::vector<std::string>> seen;
  for (const Example& e : exclude) seen.insert(e.source_text);
  std::vector<Example> examples;
  while (examples.size() < count) {
    std::vector<std::string> sentence = language.random_sentence(rng);
    if (!seen.insert(sentence).second) continue;
    Example e;
    e.target_text = language.translate(sentence);
    e.source = *language.encode_source(sentence, nullptr);
    e.target = language.encode_target(e.target_text);
    e.target.push_back(kEnd);
    e.source_text = std::move(sentence);
    examples.push_back(std::move(e));
  }
  return examples;
}

std::vector<std::string> split_words(const std::string& sentence) {
  std::istringstream in(sentence);
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  return words;
}

std::string join_words(const std::vector<std::string>& words) {
  std::string text;
  for (const auto& word : words) text += (text.empty() ? "" : " ") + word;
  return text;
}

}  // namespace qkv::translation
