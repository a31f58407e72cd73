// Matrices printed for people: labelled numbers, and shaded heatmaps of weights in [0, 1].
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qkv::cli {

// True when standard output is a terminal and NO_COLOR is unset (https://no-color.org).
bool use_color();

// values: [rows, cols] row-major. Each row starts with its label; columns are headed by theirs
// (cut to the cell width).
std::string render_matrix(std::span<const double> values,
                          const std::vector<std::string>& row_labels,
                          const std::vector<std::string>& col_labels, int precision);

// values: [rows, cols] row-major, each in [0, 1]. Every cell shows its value in percent on a
// shade that grows with it: a 256-colour background when `color`, else the block characters
// ' ░▒▓█', so that the picture survives a pipe or a log file.
std::string render_heatmap(std::span<const double> values,
                           const std::vector<std::string>& row_labels,
                           const std::vector<std::string>& col_labels, bool color);

}  // namespace qkv::cli
