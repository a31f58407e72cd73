// qkv plot WEIGHTS.npy: attention weights as a picture — PNG or SVG with token labels and a colour
// bar, and a shaded preview in the terminal.

#include <fmt/format.h>

#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "heatmap_image.hpp"
#include "qkv/error.hpp"
#include "qkv/npy.hpp"
#include "terminal_heatmap.hpp"

namespace qkv::cli {

namespace {

struct PlotFlags {
  std::string weights, output, rows, cols, title;
  std::optional<std::int64_t> head;
  bool grid = false, quiet = false;
};

std::vector<std::string> split_labels(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> labels;
  for (std::string label; in >> label;) labels.push_back(label);
  return labels;
}

void run_plot(const PlotFlags& flags) {
  const Tensor weights = load_npy(flags.weights);
  const std::vector<HeatmapPanel> panels =
      weight_panels(weights.view(), flags.weights, split_labels(flags.rows),
                    split_labels(flags.cols), flags.head, "--rows", "--cols");
  if (!flags.output.empty()) {
    StagedFiles files;
    add_heatmap(files, flags.output, "-o", panels, flags.title);
    files.commit();
  }
  if (flags.quiet) return;
  if (!flags.title.empty()) fmt::print("{}\n", flags.title);
  for (const HeatmapPanel& panel : panels) {
    if (!panel.title.empty()) fmt::print("{}\n", panel.title);
    fmt::print("{}\n",
               render_heatmap(panel.values, panel.row_labels, panel.col_labels, use_color()));
  }
  if (!flags.output.empty()) fmt::print("wrote {}\n", flags.output);
}

}  // namespace

void add_plot_command(CLI::App& app) {
  auto flags = std::make_shared<PlotFlags>();
  CLI::App* command = app.add_subcommand(
      "plot", "Heatmap of attention weights (.npy [Nq, Nk] or [H, Nq, Nk]) as PNG or SVG");
  command->add_option("weights", flags->weights, "weights .npy file")->required();
  command->add_option("-o,--output", flags->output, "picture to write: FILE.png or FILE.svg");
  command->add_option("--rows", flags->rows, "query labels, separated by spaces");
  command->add_option("--cols", flags->cols, "key labels, separated by spaces");
  command->add_option("--title", flags->title, "caption above the picture");
  auto* head = command->add_option("--head", flags->head, "only this head of [H, Nq, Nk]");
  auto* grid = command->add_flag("--grid", flags->grid, "one panel per head (the default)");
  head->excludes(grid);
  command->add_flag("-q,--quiet", flags->quiet, "no terminal preview");
  command->callback([flags] { run_plot(*flags); });
}

}  // namespace qkv::cli
