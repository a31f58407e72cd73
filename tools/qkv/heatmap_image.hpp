// Heatmaps of attention weights as pictures: PNG (drawn with cairo) and SVG (written directly),
// from one layout, so both show the same thing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qkv/staged_files.hpp"
#include "qkv/tensor.hpp"

namespace qkv::cli {

// One matrix of weights: values [rows, cols] row-major (finite; weights are in [0, 1]), with a
// label per row (queries, down the left) and per column (keys, along the top), and a title.
struct HeatmapPanel {
  std::vector<double> values;
  std::vector<std::string> row_labels, col_labels;
  std::string title;
};

// The panels side by side in a grid (one panel: just it), each cell shaded from white (0) to dark
// blue (the largest value of all panels), values printed in cells big enough to hold them, and one
// colour bar. `caption` goes above everything (may be empty).
// The SVG document as text.
std::string heatmap_svg(const std::vector<HeatmapPanel>& panels, const std::string& caption);
// The PNG file's bytes. Throws qkv::Error if cairo cannot draw (out of memory, or a picture wider
// or taller than cairo's 32767 pixels).
std::string heatmap_png(const std::vector<HeatmapPanel>& panels, const std::string& caption);

// The panels of an attention-weights tensor: [Nq, Nk] (one panel), [H, Nq, Nk] (one per head, or
// only `head`) or [1, H, Nq, Nk]; float32 or float64, every value finite, at most 2^20 cells to
// draw. Labels: one per query row and one per key column, or empty for 0, 1, 2, … Throws
// qkv::Error naming `what` (the tensor) or `rows_flag` / `cols_flag` (a label count that does not
// fit).
std::vector<HeatmapPanel> weight_panels(const TensorView& weights, const std::string& what,
                                        const std::vector<std::string>& row_labels,
                                        const std::vector<std::string>& col_labels,
                                        std::optional<std::int64_t> head, const char* rows_flag,
                                        const char* cols_flag);

// `s` with & < > " ' written as XML (and HTML) character references.
std::string xml_escaped(const std::string& s);

// Stages `path` (.png or .svg, by its extension) in `files`, written when they are committed
// (all or nothing). Throws qkv::Error naming `flag` for any other extension.
void add_heatmap(StagedFiles& files, const std::string& path, const char* flag,
                 const std::vector<HeatmapPanel>& panels, const std::string& caption);

}  // namespace qkv::cli
