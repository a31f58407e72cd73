// One layout, two painters: the geometry of a heatmap figure is computed once (text widths
// estimated from the font size, so PNG and SVG agree) and handed to a Painter that either appends
// SVG elements or draws with cairo onto an image surface.

#include "heatmap_image.hpp"

#include <cairo.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <numbers>
#include <ostream>

#include "qkv/error.hpp"

namespace qkv::cli {

namespace {

struct Rgb {
  double r, g, b;  // in [0, 1]
};

// White through light and mid blue to a dark navy: light = little weight, dark = much.
Rgb shade(double t) {
  static constexpr std::array<std::array<double, 3>, 5> kStops{
      {{255, 255, 255}, {204, 222, 240}, {116, 172, 214}, {42, 110, 178}, {12, 44, 98}}};
  t = std::clamp(t, 0.0, 1.0) * (kStops.size() - 1);
  const auto low = std::min(static_cast<std::size_t>(t), kStops.size() - 2);
  const double f = t - static_cast<double>(low);
  const auto mix = [&](std::size_t c) {
    return ((1 - f) * kStops[low][c] + f * kStops[low + 1][c]) / 255.0;
  };
  return {mix(0), mix(1), mix(2)};
}

constexpr Rgb kInk{0.13, 0.13, 0.15}, kPaper{1, 1, 1}, kFrame{0.55, 0.55, 0.6};

enum class Anchor { start, middle, end };

// What a figure is drawn with.
class Painter {
 public:
  virtual ~Painter() = default;
  virtual void rect(double x, double y, double w, double h, Rgb fill) = 0;
  // Text whose baseline starts, is centred or ends at (x, y), turned by `degrees` (negative:
  // counter-clockwise) around that point.
  virtual void text(double x, double y, const std::string& s, double size, Anchor anchor,
                    double degrees, Rgb ink, bool bold) = 0;
};

constexpr double kFont = 13.0, kMargin = 16.0, kGap = 28.0;
constexpr std::int64_t kMaxCells = 1 << 20;

// Width of a UTF-8 string in the figure's font, estimated (code points × 0.62 em).
double text_width(const std::string& s, double size) {
  std::size_t code_points = 0;
  for (const char c : s) code_points += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
  return static_cast<double>(code_points) * 0.62 * size;
}

double widest(const std::vector<std::string>& labels, double size) {
  double w = 0;
  for (const auto& label : labels) w = std::max(w, text_width(label, size));
  return w;
}

struct Layout {
  double cell = 0, row_label_width = 0, col_label_height = 0, title_height = 0;
  double caption_height = 0, panel_width = 0, panel_height = 0, bar_x = 0, width = 0, height = 0;
  std::size_t grid_columns = 1, grid_rows = 1, rows = 0, cols = 0;
  double largest = 0;
  bool percent = true;  // every value in [0, 1]: cells print percent
};

Layout layout_of(const std::vector<HeatmapPanel>& panels, const std::string& caption) {
  Layout l;
  for (const auto& p : panels) {
    l.rows = std::max(l.rows, p.row_labels.size());
    l.cols = std::max(l.cols, p.col_labels.size());
    l.row_label_width = std::max(l.row_label_width, widest(p.row_labels, kFont) + 8);
    l.col_label_height = std::max(l.col_label_height, widest(p.col_labels, kFont) + 8);
    for (const double v : p.values) {
      l.largest = std::max(l.largest, v);
      if (v < 0 || v > 1) l.percent = false;
    }
  }
  const double biggest_side = static_cast<double>(std::max<std::size_t>({l.rows, l.cols, 1}));
  l.cell = std::clamp(std::round(420.0 / biggest_side), 10.0, 44.0);
  l.title_height = panels.size() > 1 || !panels[0].title.empty() ? kFont + 10 : 0;
  l.caption_height = caption.empty() ? 0 : kFont + 14;
  l.panel_width = l.row_label_width + static_cast<double>(l.cols) * l.cell;
  l.panel_height = l.title_height + l.col_label_height + static_cast<double>(l.rows) * l.cell;
  l.grid_columns =
      static_cast<std::size_t>(std::ceil(std::sqrt(static_cast<double>(panels.size()))));
  l.grid_rows = (panels.size() + l.grid_columns - 1) / l.grid_columns;
  const double grid_width = static_cast<double>(l.grid_columns) * l.panel_width +
                            static_cast<double>(l.grid_columns - 1) * kGap;
  const double grid_height = static_cast<double>(l.grid_rows) * l.panel_height +
                             static_cast<double>(l.grid_rows - 1) * kGap;
  l.bar_x = kMargin + grid_width + kGap;
  l.width = l.bar_x + 18 + 8 + text_width("0.000", kFont) + kMargin;
  l.height = kMargin + l.caption_height + grid_height + kMargin;
  if (l.largest <= 0) l.largest = 1;  // an all-zero picture is white
  return l;
}

void paint(Painter& painter, const std::vector<HeatmapPanel>& panels, const std::string& caption) {
  const Layout l = layout_of(panels, caption);
  painter.rect(0, 0, l.width, l.height, kPaper);
  if (!caption.empty()) {
    painter.text(kMargin, kMargin + kFont, caption, kFont + 1, Anchor::start, 0, kInk, true);
  }
  const double top = kMargin + l.caption_height;
  for (std::size_t n = 0; n < panels.size(); ++n) {
    const HeatmapPanel& p = panels[n];
    const double x0 = kMargin + static_cast<double>(n % l.grid_columns) * (l.panel_width + kGap);
    const double y0 = top + static_cast<double>(n / l.grid_columns) * (l.panel_height + kGap);
    if (l.title_height > 0) {
      painter.text(x0 + l.row_label_width + static_cast<double>(p.col_labels.size()) * l.cell / 2,
                   y0 + kFont, p.title, kFont, Anchor::middle, 0, kInk, true);
    }
    const double mx = x0 + l.row_label_width, my = y0 + l.title_height + l.col_label_height;
    const double cols = static_cast<double>(p.col_labels.size()),
                 rows = static_cast<double>(p.row_labels.size());
    painter.rect(mx - 1, my - 1, cols * l.cell + 2, rows * l.cell + 2, kFrame);
    for (std::size_t c = 0; c < p.col_labels.size(); ++c) {  // keys: read upwards
      painter.text(mx + (static_cast<double>(c) + 0.5) * l.cell + 0.35 * kFont, my - 6,
                   p.col_labels[c], kFont, Anchor::start, -90, kInk, false);
    }
    for (std::size_t r = 0; r < p.row_labels.size(); ++r) {
      const double y = my + static_cast<double>(r) * l.cell;
      painter.text(mx - 6, y + l.cell / 2 + 0.35 * kFont, p.row_labels[r], kFont, Anchor::end, 0,
                   kInk, false);
      for (std::size_t c = 0; c < p.col_labels.size(); ++c) {
        const double v = p.values[r * p.col_labels.size() + c], t = v / l.largest;
        const double x = mx + static_cast<double>(c) * l.cell;
        painter.rect(x, y, l.cell, l.cell, shade(t));
        if (l.cell >= 30) {
          const std::string number =
              l.percent ? fmt::format("{}", std::lround(100 * v)) : fmt::format("{:.2g}", v);
          painter.text(x + l.cell / 2, y + l.cell / 2 + 0.35 * (kFont - 2), number, kFont - 2,
                       Anchor::middle, 0, t > 0.5 ? kPaper : kInk, false);
        }
      }
    }
  }
  // The colour bar: 0 at the bottom, the largest value at the top.
  const double bar_top = top + l.title_height + l.col_label_height;
  const double bar_height = std::max(60.0, std::min(static_cast<double>(l.rows) * l.cell, 260.0));
  constexpr int kSteps = 64;
  painter.rect(l.bar_x - 1, bar_top - 1, 20, bar_height + 2, kFrame);
  for (int s = 0; s < kSteps; ++s) {
    const double y = bar_top + bar_height * s / kSteps;
    painter.rect(l.bar_x, y, 18, bar_height / kSteps + 0.5, shade(1.0 - (s + 0.5) / kSteps));
  }
  for (const double f : {0.0, 0.5, 1.0}) {
    painter.text(l.bar_x + 26, bar_top + bar_height * (1 - f) + 0.35 * kFont,
                 fmt::format("{:.3g}", f * l.largest), kFont - 1, Anchor::start, 0, kInk, false);
  }
}

// ---- SVG ----------------------------------------------------------------------------------------

std::string css(Rgb c) {
  return fmt::format("#{:02x}{:02x}{:02x}", std::lround(c.r * 255), std::lround(c.g * 255),
                     std::lround(c.b * 255));
}

class SvgPainter : public Painter {
 public:
  std::string body;
  void rect(double x, double y, double w, double h, Rgb fill) override {
    body += fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" "
        "fill=\"{}\"/>\n",
        x, y, w, h, css(fill));
  }
  void text(double x, double y, const std::string& s, double size, Anchor anchor, double degrees,
            Rgb ink, bool bold) override {
    static const char* const kAnchors[] = {"start", "middle", "end"};
    body += fmt::format(
        "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"{:.0f}\" text-anchor=\"{}\" "
        "fill=\"{}\"{}{}>{}</text>\n",
        x, y, size, kAnchors[static_cast<int>(anchor)], css(ink),
        bold ? " font-weight=\"bold\"" : "",
        degrees != 0 ? fmt::format(" transform=\"rotate({:.0f} {:.1f} {:.1f})\"", degrees, x, y)
                     : "",
        xml_escaped(s));
  }
};

// ---- PNG (cairo) --------------------------------------------------------------------------------

class CairoPainter : public Painter {
 public:
  explicit CairoPainter(cairo_t* cr) : cr_(cr) {}
  void rect(double x, double y, double w, double h, Rgb fill) override {
    cairo_set_source_rgb(cr_, fill.r, fill.g, fill.b);
    cairo_rectangle(cr_, x, y, w, h);
    cairo_fill(cr_);
  }
  void text(double x, double y, const std::string& s, double size, Anchor anchor, double degrees,
            Rgb ink, bool bold) override {
    cairo_save(cr_);
    cairo_select_font_face(cr_, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL,
                           bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr_, size);
    cairo_text_extents_t extents;
    cairo_text_extents(cr_, s.c_str(), &extents);
    const double shift = anchor == Anchor::start    ? 0.0
                         : anchor == Anchor::middle ? extents.x_advance / 2
                                                    : extents.x_advance;
    cairo_translate(cr_, x, y);
    cairo_rotate(cr_, degrees * std::numbers::pi / 180.0);
    cairo_move_to(cr_, -shift, 0);
    cairo_set_source_rgb(cr_, ink.r, ink.g, ink.b);
    cairo_show_text(cr_, s.c_str());
    cairo_restore(cr_);
  }

 private:
  cairo_t* cr_;
};

cairo_status_t append_bytes(void* closure, const unsigned char* data, unsigned int length) {
  static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

}  // namespace

std::string xml_escaped(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string heatmap_svg(const std::vector<HeatmapPanel>& panels, const std::string& caption) {
  const Layout l = layout_of(panels, caption);
  SvgPainter painter;
  paint(painter, panels, caption);
  return fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
      "viewBox=\"0 0 {0:.0f} {1:.0f}\" font-family=\"DejaVu Sans, Verdana, sans-serif\">\n"
      "{2}</svg>\n",
      std::ceil(l.width), std::ceil(l.height), painter.body);
}

std::string heatmap_png(const std::vector<HeatmapPanel>& panels, const std::string& caption) {
  const Layout l = layout_of(panels, caption);
  cairo_surface_t* surface =
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, static_cast<int>(std::ceil(l.width)),
                                 static_cast<int>(std::ceil(l.height)));
  cairo_t* cr = cairo_create(surface);
  CairoPainter painter(cr);
  paint(painter, panels, caption);
  std::string bytes;
  const cairo_status_t status =
      cairo_status(cr) != CAIRO_STATUS_SUCCESS
          ? cairo_status(cr)
          : cairo_surface_write_to_png_stream(surface, append_bytes, &bytes);
  cairo_destroy(cr);
  cairo_surface_destroy(surface);
  if (status != CAIRO_STATUS_SUCCESS) {
    throw Error(
        fmt::format("PNG: cairo could not draw the heatmap: {}", cairo_status_to_string(status)));
  }
  return bytes;
}

std::vector<HeatmapPanel> weight_panels(const TensorView& weights, const std::string& what,
                                        const std::vector<std::string>& row_labels,
                                        const std::vector<std::string>& col_labels,
                                        std::optional<std::int64_t> head, const char* rows_flag,
                                        const char* cols_flag) {
  if (weights.dtype != DType::float32 && weights.dtype != DType::float64) {
    throw Error(fmt::format("{}: expected float32 or float64 weights, got {}", what,
                            dtype_name(weights.dtype)));
  }
  if (weights.rank < 2 || weights.rank > 4 || (weights.rank == 4 && weights.shape[0] != 1)) {
    throw Error(fmt::format("{}: expected [Nq, Nk], [H, Nq, Nk] or [1, H, Nq, Nk], got {}", what,
                            weights.shape_string()));
  }
  const TensorView w = weights.with_rank(3);  // [H, Nq, Nk]
  const std::int64_t heads = w.shape[0], rows = w.shape[1], cols = w.shape[2];
  if (heads < 1 || rows < 1 || cols < 1) {
    throw Error(fmt::format("{}: expected at least one head, query and key, got {}", what,
                            weights.shape_string()));
  }
  const std::int64_t cells = (head ? 1 : heads) * rows * cols;
  if (cells > kMaxCells) {  // a picture nobody could read, and an SVG of gigabytes
    throw Error(
        fmt::format("{}: expected at most {} cells to draw, got {} (pick a --head or a "
                    "slice)",
                    what, kMaxCells, cells));
  }
  const auto labels = [](const std::vector<std::string>& given, std::int64_t count,
                         const char* flag, const char* dimension) {
    if (given.empty()) {
      std::vector<std::string> numbers;
      for (std::int64_t n = 0; n < count; ++n) numbers.push_back(std::to_string(n));
      return numbers;
    }
    if (static_cast<std::int64_t>(given.size()) != count) {
      throw Error(
          fmt::format("{}: expected {} labels ({}), got {}", flag, count, dimension, given.size()));
    }
    return given;
  };
  const std::vector<std::string> row_names = labels(row_labels, rows, rows_flag, "Nq");
  const std::vector<std::string> col_names = labels(col_labels, cols, cols_flag, "Nk");
  if (head && (*head < 0 || *head >= heads)) {
    throw Error(fmt::format("--head: expected a head in [0, {}), got {}", heads, *head));
  }
  std::vector<HeatmapPanel> panels;
  for (std::int64_t h = head.value_or(0); h < (head ? *head + 1 : heads); ++h) {
    HeatmapPanel panel{{}, row_names, col_names, heads > 1 ? fmt::format("head {}", h) : ""};
    panel.values.reserve(static_cast<std::size_t>(rows * cols));
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t j = 0; j < cols; ++j) {
        const std::int64_t at = h * w.strides[0] + i * w.strides[1] + j * w.strides[2];
        const double v = w.dtype == DType::float32 ? static_cast<const float*>(w.data)[at]
                                                   : static_cast<const double*>(w.data)[at];
        if (!std::isfinite(v)) {
          throw Error(
              fmt::format("{}: expected finite weights, got {} at [{}, {}, {}]", what, v, h, i, j));
        }
        panel.values.push_back(v);
      }
    }
    panels.push_back(std::move(panel));
  }
  return panels;
}

void add_heatmap(StagedFiles& files, const std::string& path, const char* flag,
                 const std::vector<HeatmapPanel>& panels, const std::string& caption) {
  std::string extension = std::filesystem::path(path).extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (extension != ".png" && extension != ".svg") {
    throw Error(fmt::format("{}: expected a .png or .svg file, got '{}'", flag, path));
  }
  const std::string bytes =
      extension == ".png" ? heatmap_png(panels, caption) : heatmap_svg(panels, caption);
  files.add(path, [&](std::ostream& out) {
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  });
}

}  // namespace qkv::cli
