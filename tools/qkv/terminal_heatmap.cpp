#include "terminal_heatmap.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace qkv::cli {

namespace {

constexpr int kHeatCellWidth = 6;    // " ▓▓ 43"
constexpr int kNumberCellWidth = 8;  // " -10.23" with room to spare

std::size_t label_width(const std::vector<std::string>& labels) {
  std::size_t width = 0;
  for (const std::string& label : labels) width = std::max(width, label.size());
  return width;
}

std::string header(const std::vector<std::string>& row_labels,
                   const std::vector<std::string>& col_labels, int cell_width) {
  std::string line(label_width(row_labels) + 1, ' ');
  for (const std::string& label : col_labels) {
    line += fmt::format("{:>{}}", label.substr(0, static_cast<std::size_t>(cell_width - 1)),
                        cell_width);
  }
  return line + "\n";
}

}  // namespace

bool use_color() {
  return ::isatty(STDOUT_FILENO) == 1 && std::getenv("NO_COLOR") == nullptr;
}

std::string render_matrix(std::span<const double> values,
                          const std::vector<std::string>& row_labels,
                          const std::vector<std::string>& col_labels, int precision) {
  std::string text = header(row_labels, col_labels, kNumberCellWidth);
  const std::size_t width = label_width(row_labels);
  for (std::size_t r = 0; r < row_labels.size(); ++r) {
    text += fmt::format("{:<{}} ", row_labels[r], width);
    for (std::size_t c = 0; c < col_labels.size(); ++c) {
      text +=
          fmt::format("{:>{}.{}f}", values[r * col_labels.size() + c], kNumberCellWidth, precision);
    }
    text += "\n";
  }
  return text;
}

std::string render_heatmap(std::span<const double> values,
                           const std::vector<std::string>& row_labels,
                           const std::vector<std::string>& col_labels, bool color) {
  static const char* const kShades[] = {" ", "░", "▒", "▓", "█"};
  std::string text = header(row_labels, col_labels, kHeatCellWidth);
  const std::size_t width = label_width(row_labels);
  for (std::size_t r = 0; r < row_labels.size(); ++r) {
    text += fmt::format("{:<{}} ", row_labels[r], width);
    for (std::size_t c = 0; c < col_labels.size(); ++c) {
      const double value = std::clamp(values[r * col_labels.size() + c], 0.0, 1.0);
      const long percent = std::lround(100.0 * value);
      if (color) {
        // The 24 greys of the 256-colour palette, dark to light; dark text on light cells.
        const int grey = 232 + static_cast<int>(std::lround(23.0 * std::sqrt(value)));
        text += fmt::format("\x1b[48;5;{}m\x1b[38;5;{}m{:>{}} \x1b[0m", grey,
                            grey > 245 ? 232 : 252, percent, kHeatCellWidth - 1);
      } else {
        const char* shade = kShades[std::lround(4.0 * std::sqrt(value))];
        text += fmt::format(" {}{}{:>3}", shade, shade, percent);
      }
    }
    text += "\n";
  }
  return text;
}

}  // namespace qkv::cli
