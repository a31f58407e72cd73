#include "explain_page.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "heatmap_image.hpp"

namespace qkv::cli {

namespace {

// How a cell is coloured: weights from white to blue; signed values blue (negative) through
// white to red (positive), by their size against the largest in the matrix.
enum class Shading { weights, signed_values };

// One matrix as a table: rows × cols values (row-major, stride `stride` between rows), a label
// per row and per column, and a caption below.
std::string table(const double* values, std::size_t rows, std::size_t cols, std::size_t stride,
                  const std::vector<std::string>& row_labels,
                  const std::vector<std::string>& col_labels, Shading shading,
                  const std::string& caption) {
  double largest = 0;
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < cols; ++c) {
      const double value = values[r * stride + c];
      if (std::isfinite(value)) largest = std::max(largest, std::abs(value));
    }
  }
  std::string html = "<figure><table><tr><th></th>";
  for (const std::string& label : col_labels) html += "<th>" + xml_escaped(label) + "</th>";
  html += "</tr>\n";
  for (std::size_t r = 0; r < rows; ++r) {
    html += "<tr><th>" + xml_escaped(row_labels[r]) + "</th>";
    for (std::size_t c = 0; c < cols; ++c) {
      const double value = values[r * stride + c];
      if (!std::isfinite(value)) {
        html += "<td class=\"masked\">−∞</td>";
        continue;
      }
      const double share = largest > 0 ? std::abs(value) / largest : 0.0;
      const int fade = static_cast<int>(std::lround(255.0 * (1.0 - share)));
      const std::string colour = shading == Shading::signed_values && value > 0
                                     ? fmt::format("rgb(255,{0},{0})", fade)
                                     : fmt::format("rgb({0},{0},255)", fade);
      html += fmt::format("<td style=\"background:{}{}\">{:.{}f}</td>", colour,
                          share > 0.6 ? ";color:white" : "", value,
                          shading == Shading::weights ? 2 : 3);
    }
    html += "</tr>\n";
  }
  return html + "</table><figcaption>" + caption + "</figcaption></figure>\n";
}

std::vector<std::string> feature_labels(std::int64_t count) {
  std::vector<std::string> labels;
  for (std::int64_t f = 0; f < count; ++f) labels.push_back(std::to_string(f));
  return labels;
}

}  // namespace

std::string explain_page(const ExplainedAttention& s, const std::string& source,
                         std::size_t query) {
  const std::size_t n = s.words.size();
  const auto heads = static_cast<std::size_t>(s.heads), dh = static_cast<std::size_t>(s.head_dim);
  const std::size_t e = heads * dh;
  std::string sentence;
  for (const std::string& word : s.words) sentence += (sentence.empty() ? "" : " ") + word;
  const std::string title = fmt::format("Attention, step by step: “{}”", xml_escaped(sentence));
  std::string html = fmt::format(
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n"
      "<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}}"
      "table{{border-collapse:collapse;font-size:0.85em}}th,td{{padding:0.25em 0.5em}}"
      "td{{text-align:right;font-family:monospace}}td.masked{{background:#ddd;color:#777}}"
      "figure{{margin:1em 0;overflow-x:auto}}figcaption{{font-size:0.9em;color:#333;"
      "margin-top:0.4em}}</style></head><body>\n<h1>{}</h1>\n<p>{}. {} words, {} head{} of {} "
      "features, score <b>{}</b>{}.</p>\n",
      title, title, xml_escaped(source), n, heads, heads == 1 ? "" : "s", dh, score_name(s.score),
      s.causal ? ", causal mask" : "");

  const std::vector<std::string> features = feature_labels(static_cast<std::int64_t>(dh));
  html += "<section id=\"input\"><h2>The input rows X</h2>\n";
  html +=
      table(s.x.data<double>(), n, e, e, s.words, feature_labels(static_cast<std::int64_t>(e)),
            Shading::signed_values, fmt::format("X [{}, {}]: one row of features per word.", n, e));
  html += "</section>\n<section id=\"step1\"><h2>Step 1 — project: Q, K and V</h2>\n";
  for (std::size_t h = 0; h < heads; ++h) {
    const char* const names[] = {"Q", "K", "V"};
    const char* const roles[] = {"what each word asks", "what each word offers to be found by",
                                 "what each word carries"};
    const Tensor* const tensors[] = {&s.q, &s.k, &s.v};
    for (int t = 0; t < 3; ++t) {
      html += table(
          tensors[t]->data<double>() + h * dh, n, dh, e, s.words, features, Shading::signed_values,
          fmt::format("{0} (head {1}) = X·W{2}ᵀ + b{2}, [{3}, {4}]: {5}.", names[t], h + 1,
                      static_cast<char>(names[t][0] + 'a' - 'A'), n, dh, roles[t]));
    }
  }
  html += "</section>\n<section id=\"step2\"><h2>Step 2 — score each query against each key</h2>\n";
  for (std::size_t h = 0; h < heads; ++h) {
    html += table(s.scores.data<double>() + h * n * n, n, n, n, s.words, s.words,
                  Shading::signed_values,
                  fmt::format("Scores (head {}): s<sub>ij</sub> = {}, times the scale {:.4g}; row "
                              "i is the query, column j the key.",
                              h + 1, xml_escaped(score_formula(s.score)), s.scale));
    if (s.causal) {
      html += table(s.masked_scores.data<double>() + h * n * n, n, n, n, s.words, s.words,
                    Shading::signed_values,
                    fmt::format("Masked scores (head {}): the causal mask hides key j from "
                                "query i when j &gt; i (−∞).",
                                h + 1));
    }
  }
  html += "</section>\n<section id=\"step3\"><h2>Step 3 — softmax: weights</h2>\n";
  for (std::size_t h = 0; h < heads; ++h) {
    html += table(s.weights.data<double>() + h * n * n, n, n, n, s.words, s.words, Shading::weights,
                  fmt::format("Weights (head {}): P<sub>ij</sub> = exp(s<sub>ij</sub>) / "
                              "Σ<sub>j</sub> exp(s<sub>ij</sub>); each row sums to 1.",
                              h + 1));
  }
  html += "</section>\n<section id=\"step4\"><h2>Step 4 — average V with the weights</h2>\n";
  for (std::size_t h = 0; h < heads; ++h) {
    html +=
        table(s.output.data<double>() + h * dh, n, dh, e, s.words, features, Shading::signed_values,
              fmt::format("Output (head {}): O<sub>i</sub> = Σ<sub>j</sub> P<sub>ij</sub> "
                          "V<sub>j</sub>, [{}, {}].",
                          h + 1, n, dh));
    std::string terms;
    for (std::size_t j = 0; j < n; ++j) {
      const double weight = s.weights.data<double>()[(h * n + query) * n + j];
      if (weight == 0) continue;
      terms += fmt::format("{}{:.3f}·V[{}]", terms.empty() ? "" : " + ", weight,
                           xml_escaped(s.words[j]));
    }
    html += fmt::format("<p class=\"sum\">O[{}] (head {}) = {}</p>\n", xml_escaped(s.words[query]),
                        h + 1, terms);
  }
  html += fmt::format(
      "</section>\n<p>Checked: qkv's fast path (attention_forward in float32, {}) gives the same "
      "output within {:.2g}.</p>\n</body></html>\n",
      xml_escaped(s.fast_path_target), s.fast_path_difference);
  return html;
}

}  // namespace qkv::cli
