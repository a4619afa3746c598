// The run report on hand-written metrics: a long run's heatmap averaged into at most 240 columns (the share of each
// expert per column is the mean of its records'), non-finite losses (written as null) left out of the lines, a run
// without MoE metrics, and the text escaped.
#include "trainer/report.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "trainer/svg_plot.h"

namespace moetrain::trainer {
namespace {
namespace fs = std::filesystem;

fs::path write_run(const std::string& name, const std::vector<nlohmann::json>& records) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("moetrain_report_{}_{}", ::getpid(), name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream out(dir / "metrics.jsonl");
  for (const auto& r : records) out << r.dump() << '\n';
  return dir;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The points attribute of the polyline labelled `label` in the plot `plot`.
std::string points_of(const std::string& html, const std::string& plot, const std::string& label) {
  const size_t start = html.find(fmt::format("data-plot=\"{}\"", plot));
  EXPECT_NE(start, std::string::npos) << plot;
  const size_t line = html.find(fmt::format("data-label=\"{}\"", label), start);
  EXPECT_NE(line, std::string::npos) << label;
  const size_t p = html.find("points=\"", line) + 8;
  return html.substr(p, html.find('"', p) - p);
}

TEST(Report, LongRunsAverageTheHeatmapIntoColumnsAndSkipNonFiniteLosses) {
  // 480 steps, 2 experts: expert 0 takes 1/4 of the tokens at odd steps and 3/4 at even ones, so each of the 240
  // columns (two records each) averages to 1/2 and is white.
  std::vector<nlohmann::json> records;
  for (int step = 1; step <= 480; ++step) {
    const int a = step % 2 ? 25 : 75;
    nlohmann::json r = {{"step", step},       {"loss", step == 7 ? nlohmann::json(nullptr) : nlohmann::json(2.0)},
                        {"lm_loss", 2.0},     {"lr", 1e-3},
                        {"grad_norm", 1.0},   {"tokens_per_s", 100.0},
                        {"step_time_s", 1.0}, {"mfu", 0.5}};
    r["moe"] = {{{"layer", "layers.1"},
                 {"max_vio", 0.5},
                 {"bias_min", -0.1},
                 {"bias_max", 0.1},
                 {"tokens", {a, 100 - a}},
                 {"bias", {-0.1, 0.1}}}};
    records.push_back(r);
  }
  records.push_back({{"step", 480}, {"val_loss", 2.5}, {"val_max_vio", 0.2}, {"entropy_rate", 1.25}});
  const fs::path dir = write_run("long", records);
  const std::string html = report_html({read_run(dir.string())});
  EXPECT_NE(html.find("data-records=\"480\" data-columns=\"240\" data-experts=\"2\""), std::string::npos);
  EXPECT_EQ(count(html, "class=\"cell\""), 2u * 240u);
  EXPECT_EQ(count(html, "class=\"cell\" "), count(html, "fill=\"#ffffff\"/>")) << "every column averages to 1/2";
  const std::string name = dir.filename().string();
  EXPECT_EQ(count(points_of(html, "loss", name + ": train"), ","), 479u);  // step 7's null left out
  EXPECT_EQ(count(points_of(html, "loss", name + ": validation"), ","), 1u);
  EXPECT_NE(html.find("corpus entropy rate 1.2500"), std::string::npos);
  EXPECT_NE(html.find(": summary: 480 steps (0 → 480), 48000 tokens"), std::string::npos);
  EXPECT_NE(html.find("val loss 2.5000 at step 480 (gap 1.2500 to the entropy rate)"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Report, ARunWithoutMoeMetricsAndTextToEscape) {
  const fs::path dir = write_run("dense<&>", {{{"step", 1}, {"loss", 3.0}, {"lm_loss", 3.0}}});
  std::ofstream(dir / "config.yaml") << "# a <config> & more\n";
  const RunData run = read_run(dir.string());
  EXPECT_EQ(run.steps.size(), 1u);
  const std::string html = report_html({run});
  EXPECT_NE(html.find("No MoE layer metrics in these runs."), std::string::npos);
  EXPECT_NE(html.find("dense&lt;&amp;&gt;"), std::string::npos);
  EXPECT_NE(html.find("# a &lt;config&gt; &amp; more"), std::string::npos);
  EXPECT_EQ(html.find("dense<&>"), std::string::npos);
  EXPECT_EQ(html.find("data-plot=\"lr\""), std::string::npos) << "no chart of a metric no run has";
  fs::remove_all(dir);
}

TEST(Report, TwoRunsOfOneNameAreToldApartByPath) {
  const fs::path a = write_run("twin_a", {{{"step", 1}, {"loss", 3.0}}}) / "run";
  const fs::path b = write_run("twin_b", {{{"step", 1}, {"loss", 4.0}}}) / "run";
  for (const auto& d : {a, b}) {
    fs::create_directories(d);
    fs::copy_file(d.parent_path() / "metrics.jsonl", d / "metrics.jsonl");
  }
  const std::string html = report_html({read_run(a.string()), read_run(b.string())});
  EXPECT_NE(html.find(fmt::format("data-label=\"{}: train\"", a.string())), std::string::npos);
  EXPECT_NE(html.find(fmt::format("data-label=\"{}: train\"", b.string())), std::string::npos);
  fs::remove_all(a.parent_path()), fs::remove_all(b.parent_path());
}

}  // namespace
}  // namespace moetrain::trainer
