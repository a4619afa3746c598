// Plots as inline SVG for the run report (trainer/report.h): line charts over steps and heatmaps, self-contained
// (no scripts, no fonts or styles from elsewhere), written as well-formed XML so that any XML parser reads them.
// Each drawn series is one <polyline class="series" data-label=...> whose points are the series' finite points, in
// order; a heatmap's cells are <rect class="cell"> elements.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace moetrain::trainer::svg {

// &, <, >, " and ' as entities.
std::string escape(const std::string& text);

// A colour of a fixed palette that stays distinguishable for the first ~10 indices.
std::string palette(size_t index);

struct Series {
  std::string label;  // data-label, and the legend's text unless `legend` is false
  std::string color;
  std::vector<std::pair<double, double>> points;  // (x, y); non-finite y are left out of the line
  bool dashed = false;
  bool markers = false;  // a dot at each point (sparse series: validation losses)
  bool legend = true;
};

struct LineChart {
  std::string id;  // data-plot attribute: what the test and a reader find the chart by
  std::string title;
  std::string x_label = "step";
  std::string y_label;
  std::vector<Series> series;
  std::vector<std::pair<std::string, double>> reference_lines;  // horizontal, labelled (an entropy floor)
  int width = 540, height = 250;
};
std::string render(const LineChart& chart);

// values[row][column] in [0, ∞), coloured on a diverging scale around `center` (white): blue below it (full at 0),
// red above (full at `high`: the largest value, at least 2·center).
struct Heatmap {
  std::string id, title, x_label, y_label;
  std::vector<std::string> attributes;  // extra `name="value"` attributes of the <svg> (escaped by the caller)
  std::vector<double> column_x;         // the x value (step) each column ends at
  std::vector<std::vector<double>> values;
  double center = 1;
  std::string legend;  // what the colours mean
  int width = 640, height = 180;
};
std::string render(const Heatmap& map);

// "0.001", "1.5e+04", "250": a short label for an axis tick or a table cell.
std::string short_number(double v);

}  // namespace moetrain::trainer::svg
