#include "trainer/svg_plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace moetrain::trainer::svg {
namespace {

constexpr int kLeft = 64, kRight = 16, kTop = 28, kBottom = 40, kLegendRow = 16;

struct Range {
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
  void add(double v) {
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  bool empty() const { return lo > hi; }
  // Widened when flat, so that a constant series sits mid-height.
  void pad() {
    if (empty()) lo = 0, hi = 1;
    if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) {
      const double d = std::max(std::abs(hi) * 0.05, 1e-9);
      lo -= d, hi += d;
    }
  }
};

// Ticks at 1, 2 or 5 × 10^k inside [lo, hi], about `target` of them.
std::vector<double> ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> out;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step)
    out.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return out;
}

// The legend under a chart: items wrapped into rows that fit `width`. Returns the rows' SVG and their count.
struct Legend {
  std::string svg;
  int rows = 0;
};
Legend legend(const std::vector<std::pair<std::string, std::string>>& items, const std::string& style, int width,
              int y) {
  Legend out;
  if (items.empty()) return out;
  double x = kLeft;
  out.rows = 1;
  for (const auto& [label, color] : items) {
    const double w = 28 + 6.2 * static_cast<double>(label.size());
    if (x + w > width && x > kLeft) x = kLeft, ++out.rows;
    const double ly = y + (out.rows - 1) * kLegendRow;
    out.svg += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\"{}/>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\">{}</text>",
        x, ly - 4, x + 18, ly - 4, color, style, x + 22, ly, escape(label));
    x += w;
  }
  return out;
}

std::string frame(const std::string& title, const std::string& x_label, const std::string& y_label, int width,
                  int plot_bottom) {
  return fmt::format(
      "<text x=\"{}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>"
      "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>"
      "<text x=\"{:.1f}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>"
      "<text x=\"12\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"middle\" transform=\"rotate(-90 12 "
      "{:.1f})\">{}</text>",
      kLeft, escape(title), kLeft, kTop, width - kLeft - kRight, plot_bottom - kTop, (kLeft + width - kRight) / 2.0,
      plot_bottom + 32, escape(x_label), (kTop + plot_bottom) / 2.0, (kTop + plot_bottom) / 2.0, escape(y_label));
}

}  // namespace

std::string escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
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
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string palette(size_t index) {
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                 "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  return colors[index % (sizeof(colors) / sizeof(colors[0]))];
}

std::string short_number(double v) {
  if (!std::isfinite(v)) return std::isnan(v) ? "NaN" : (v > 0 ? "inf" : "-inf");
  const double a = std::abs(v);
  if (a != 0 && (a < 1e-3 || a >= 1e5)) return fmt::format("{:.3g}", v);
  return fmt::format("{:.4g}", v);
}

std::string render(const LineChart& chart) {
  Range xr, yr;
  size_t finite = 0;
  for (const auto& s : chart.series)
    for (const auto& [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) xr.add(x), yr.add(y), ++finite;
  for (const auto& [label, y] : chart.reference_lines) yr.add(y);
  xr.pad(), yr.pad();
  const double margin = (yr.hi - yr.lo) * 0.04;
  yr.lo -= margin, yr.hi += margin;

  const int plot_bottom = chart.height - kBottom;
  const double pw = chart.width - kLeft - kRight, ph = plot_bottom - kTop;
  auto px = [&](double x) { return kLeft + (x - xr.lo) / (xr.hi - xr.lo) * pw; };
  auto py = [&](double y) { return plot_bottom - (y - yr.lo) / (yr.hi - yr.lo) * ph; };

  std::vector<std::pair<std::string, std::string>> items;
  for (const auto& s : chart.series)
    if (s.legend) items.emplace_back(s.label, s.color);
  const Legend key = legend(items, "", chart.width, chart.height + 4);
  std::string out = fmt::format(
      "<svg class=\"plot\" data-plot=\"{}\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\">",
      escape(chart.id), chart.width, chart.height + key.rows * kLegendRow, chart.width,
      chart.height + key.rows * kLegendRow);
  out += frame(chart.title, chart.x_label, chart.y_label, chart.width, plot_bottom);
  for (double t : ticks(yr.lo, yr.hi, 5))
    out += fmt::format(
        "<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
        "<text x=\"{}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
        kLeft, py(t), chart.width - kRight, py(t), kLeft - 4, py(t) + 3, short_number(t));
  for (double t : ticks(xr.lo, xr.hi, 6))
    out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>", px(t),
                       plot_bottom + 14, short_number(t));
  for (const auto& [label, y] : chart.reference_lines)
    out += fmt::format(
        "<line class=\"reference\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#444\" "
        "stroke-dasharray=\"2 3\"/><text x=\"{}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
        kLeft, py(y), chart.width - kRight, py(y), chart.width - kRight - 2, py(y) - 3, escape(label));
  if (finite == 0)
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"12\" text-anchor=\"middle\">no data</text>",
                       kLeft + pw / 2, kTop + ph / 2);
  for (const auto& s : chart.series) {
    std::string points, dots;
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      if (!points.empty()) points += ' ';
      points += fmt::format("{:.1f},{:.1f}", px(x), py(y));
      if (s.markers)
        dots += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.5\" fill=\"{}\"/>", px(x), py(y), s.color);
    }
    out += fmt::format(
        "<polyline class=\"series\" data-label=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{} "
        "points=\"{}\"/>{}",
        escape(s.label), s.color, s.dashed ? " stroke-dasharray=\"6 3\"" : "", points, dots);
  }
  out += key.svg;
  return out + "</svg>\n";
}

std::string render(const Heatmap& map) {
  const size_t rows = map.values.size(), columns = rows ? map.values[0].size() : 0;
  const double cell_h = rows ? std::clamp(120.0 / static_cast<double>(rows), 3.0, 14.0) : 14.0;
  const int plot_bottom = kTop + static_cast<int>(std::ceil(cell_h * static_cast<double>(std::max<size_t>(rows, 1))));
  const int height = plot_bottom + kBottom + kLegendRow + 8;
  const double pw = map.width - kLeft - kRight, cell_w = columns ? pw / static_cast<double>(columns) : pw;
  std::string attributes;
  for (const auto& a : map.attributes) attributes += " " + a;
  std::string out = fmt::format(
      "<svg class=\"heatmap\" data-plot=\"{}\"{} width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\">",
      escape(map.id), attributes, map.width, height, map.width, height);
  out += frame(map.title, map.x_label, map.y_label, map.width, plot_bottom);
  double high = 2 * map.center;
  for (const auto& row : map.values)
    for (double v : row) high = std::max(high, v);
  auto color = [&](double v) {
    // White at the center, #2166ac (blue) at 0, #b2182b (red) at `high`.
    const bool below = v < map.center;
    const double f =
        below ? std::clamp(1 - v / map.center, 0.0, 1.0) : std::clamp((v - map.center) / (high - map.center), 0.0, 1.0);
    const int r0 = below ? 0x21 : 0xb2, g0 = below ? 0x66 : 0x18, b0 = below ? 0xac : 0x2b;
    auto mix = [&](int c) { return static_cast<int>(std::lround(255 + (c - 255) * f)); };
    return fmt::format("#{:02x}{:02x}{:02x}", mix(r0), mix(g0), mix(b0));
  };
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < columns; ++c)
      out += fmt::format(
          "<rect class=\"cell\" x=\"{:.2f}\" y=\"{:.2f}\" width=\"{:.2f}\" height=\"{:.2f}\" "
          "fill=\"{}\"/>",
          kLeft + cell_w * static_cast<double>(c), kTop + cell_h * static_cast<double>(r), cell_w + 0.05, cell_h + 0.05,
          color(map.values[r][c]));
  // Row labels at least 10 px apart, column labels at about six columns.
  const auto row_every = static_cast<size_t>(std::ceil(10.0 / cell_h));
  for (size_t r = 0; r < rows; ++r)
    if (r % row_every == 0)
      out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" font-size=\"9\" text-anchor=\"end\">{}</text>", kLeft - 4,
                         kTop + cell_h * (static_cast<double>(r) + 0.5) + 3, r);
  const size_t every = std::max<size_t>(1, (columns + 5) / 6);
  for (size_t c = 0; c < columns; c += every)
    out +=
        fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
                    kLeft + cell_w * (static_cast<double>(c) + 0.5), plot_bottom + 14, short_number(map.column_x[c]));
  // The colour key: five swatches from 0 through the center to the highest value.
  double x = kLeft;
  const int ky = plot_bottom + kBottom + 12;
  for (double v : {0.0, map.center / 2, map.center, (map.center + high) / 2, high}) {
    out += fmt::format(
        "<rect x=\"{:.1f}\" y=\"{}\" width=\"14\" height=\"10\" fill=\"{}\" stroke=\"#888\"/>"
        "<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\">{}</text>",
        x, ky - 9, color(v), x + 17, ky, short_number(v));
    x += 64;
  }
  out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\">{}</text>", x + 6, ky, escape(map.legend));
  return out + "</svg>\n";
}

}  // namespace moetrain::trainer::svg
