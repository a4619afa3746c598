#include "trainer/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "checkpoints/checkpoint.h"
#include "checkpoints/checkpointer.h"
#include "config/loader.h"
#include "trainer/metrics.h"
#include "trainer/svg_plot.h"

namespace moetrain::trainer {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr size_t kMaxHeatmapColumns = 240;  // longer runs: each column the mean of consecutive records

// A number of a record; NaN when absent or null (metrics.jsonl writes a non-finite value as null).
double num(const json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : kNaN;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The run's loss, validation and entropy-rate series, etc.: (step, value) of every record that has `key`.
std::vector<std::pair<double, double>> series_of(const std::vector<json>& records, const char* key, double scale = 1) {
  std::vector<std::pair<double, double>> out;
  for (const auto& r : records)
    if (r.contains(key)) out.emplace_back(num(r, "step"), num(r, key) * scale);
  return out;
}

// The MoE layers of a run, in the order of its first record.
std::vector<std::string> moe_layers(const RunData& run) {
  std::vector<std::string> out;
  if (!run.steps.empty() && run.steps.front().contains("moe"))
    for (const auto& l : run.steps.front()["moe"]) out.push_back(l.value("layer", ""));
  return out;
}

const json* layer_of(const json& record, const std::string& layer) {
  if (!record.contains("moe")) return nullptr;
  for (const auto& l : record["moe"])
    if (l.value("layer", "") == layer) return &l;
  return nullptr;
}

double entropy_rate(const RunData& run) {
  for (auto it = run.evals.rbegin(); it != run.evals.rend(); ++it)
    if (std::isfinite(num(*it, "entropy_rate"))) return num(*it, "entropy_rate");
  return -1;
}

// RunSummary's line over the run's records (the time is the steps' own, the run's wall time is not recorded).
std::string summary_line(const RunData& run) {
  RunSummary summary(run.steps.empty() ? 0 : static_cast<int64_t>(num(run.steps.front(), "step")) - 1);
  double seconds = 0;
  for (const auto& rec : run.steps) {
    StepResult r;
    r.step = static_cast<int64_t>(num(rec, "step")) - 1;
    auto finite = [&](const char* key) { return std::isfinite(num(rec, key)) ? num(rec, key) : 0.0; };
    r.tokens_per_s = finite("tokens_per_s"), r.step_time_s = finite("step_time_s"), r.mfu = finite("mfu");
    if (rec.contains("peak_mem_bytes")) r.peak_memory_bytes = rec["peak_mem_bytes"].get<std::vector<double>>();
    seconds += summary.add(r).step_time_s;
  }
  for (const auto& e : run.evals)
    summary.add(static_cast<int64_t>(num(e, "step")), EvalResult{.loss = num(e, "val_loss")});
  for (int64_t step : run.checkpoints) summary.saved(step);
  std::string line = summary.line(seconds, entropy_rate(run), run.checkpoint_root);
  if (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

svg::LineChart chart(std::string id, std::string title, std::string y_label) {
  svg::LineChart c;
  c.id = std::move(id), c.title = std::move(title), c.y_label = std::move(y_label);
  return c;
}

// One series per run of `key` (scaled), skipped for runs without it; the chart is left out (empty) when no run has
// a finite value of it, or when `nonzero` and every value is 0.
std::string per_run_chart(const std::vector<RunData>& runs, svg::LineChart c, const char* key, double scale = 1,
                          bool nonzero = false) {
  bool any = false;
  for (size_t i = 0; i < runs.size(); ++i) {
    svg::Series s{runs[i].name, svg::palette(i), series_of(runs[i].steps, key, scale)};
    for (const auto& [x, y] : s.points) any |= std::isfinite(y) && (!nonzero || y != 0);
    if (!s.points.empty()) c.series.push_back(std::move(s));
  }
  return any ? svg::render(c) : "";
}

std::string loss_charts(const std::vector<RunData>& runs) {
  svg::LineChart loss = chart("loss", "Loss: training (line) and validation (dots)", "nats/token");
  svg::LineChart parts = chart("lm-mtp", "LM loss (line) and MTP loss per depth (dashed)", "nats/token");
  std::set<double> floors;
  for (size_t i = 0; i < runs.size(); ++i) {
    const RunData& r = runs[i];
    const std::string color = svg::palette(i);
    loss.series.push_back({r.name + ": train", color, series_of(r.steps, "loss")});
    if (!r.evals.empty())
      loss.series.push_back({r.name + ": validation", color, series_of(r.evals, "val_loss"), true, true});
    if (entropy_rate(r) >= 0) floors.insert(entropy_rate(r));
    parts.series.push_back({r.name + ": LM", color, series_of(r.steps, "lm_loss")});
    size_t depths = 0;
    for (const auto& rec : r.steps) depths = std::max(depths, rec.value("mtp_losses", json::array()).size());
    for (size_t k = 0; k < depths; ++k) {
      svg::Series s{fmt::format("{}: MTP depth {}", r.name, k + 1), color, {}, true};
      for (const auto& rec : r.steps)
        if (rec.contains("mtp_losses") && rec["mtp_losses"].size() > k)
          s.points.emplace_back(num(rec, "step"),
                                rec["mtp_losses"][k].is_number() ? rec["mtp_losses"][k].get<double>() : kNaN);
      parts.series.push_back(std::move(s));
    }
  }
  for (double f : floors) loss.reference_lines.emplace_back(fmt::format("corpus entropy rate {:.4f}", f), f);
  return svg::render(loss) + svg::render(parts);
}

// Each expert's share of its layer's tokens, over the records that carry them, in at most kMaxHeatmapColumns
// columns.
std::string load_heatmap(const RunData& run, const std::string& layer) {
  std::vector<std::pair<double, std::vector<double>>> shares;  // (step, share per expert)
  for (const auto& rec : run.steps) {
    const json* l = layer_of(rec, layer);
    if (!l || !l->contains("tokens")) continue;
    std::vector<double> t = (*l)["tokens"].get<std::vector<double>>();
    double total = 0;
    for (double v : t) total += v;
    for (double& v : t) v = total > 0 ? v / total : 0;
    shares.emplace_back(num(rec, "step"), std::move(t));
  }
  if (shares.empty()) return "";
  const size_t experts = shares.front().second.size(), n = shares.size();
  const size_t columns = std::min(n, kMaxHeatmapColumns);
  svg::Heatmap map;
  map.id = fmt::format("expert-load/{}/{}", run.name, layer);
  map.title = fmt::format("{} {}: share of the routed tokens per expert", run.name, layer);
  map.x_label = "step", map.y_label = "expert";
  map.attributes = {fmt::format("data-records=\"{}\"", n), fmt::format("data-columns=\"{}\"", columns),
                    fmt::format("data-experts=\"{}\"", experts)};
  map.values.assign(experts, std::vector<double>(columns, 0.0));
  for (size_t c = 0; c < columns; ++c) {
    const size_t begin = c * n / columns, end = (c + 1) * n / columns;
    for (size_t k = begin; k < end; ++k)
      for (size_t e = 0; e < experts && e < shares[k].second.size(); ++e)
        map.values[e][c] += shares[k].second[e] / static_cast<double>(end - begin);
    map.column_x.push_back(shares[end - 1].first);
  }
  map.center = 1.0 / static_cast<double>(experts);
  map.legend = fmt::format("share of tokens (uniform: 1/{} = {})", experts, svg::short_number(map.center));
  return svg::render(map);
}

// The balancer's bias of each expert over steps (records with per-expert biases), else its range; a line of text
// when it stays 0.
std::string bias_chart(const RunData& run, const std::string& layer) {
  svg::LineChart c =
      chart(fmt::format("bias/{}/{}", run.name, layer), fmt::format("{} {}: routing bias", run.name, layer), "bias");
  c.width = 420;
  std::map<size_t, svg::Series> experts;
  svg::Series lo{"bias min", svg::palette(0), {}}, hi{"bias max", svg::palette(1), {}};
  for (const auto& rec : run.steps) {
    const json* l = layer_of(rec, layer);
    if (!l) continue;
    const double step = num(rec, "step");
    lo.points.emplace_back(step, num(*l, "bias_min")), hi.points.emplace_back(step, num(*l, "bias_max"));
    if (!l->contains("bias")) continue;
    const auto& b = (*l)["bias"];
    for (size_t e = 0; e < b.size(); ++e) {
      auto [it, fresh] = experts.try_emplace(e);
      if (fresh) it->second = {fmt::format("expert {}", e), svg::palette(e), {}, false, false, b.size() <= 10};
      it->second.points.emplace_back(step, b[e].is_number() ? b[e].get<double>() : kNaN);
    }
  }
  bool moved = false;
  for (const auto* s : {&lo, &hi})
    for (const auto& [x, y] : s->points) moved |= std::isfinite(y) && y != 0;
  if (!moved)  // no bias updates in this run (balance_mode other than aux_free): no chart of a flat line
    return fmt::format("<p class=\"flat-bias\">{} {}: routing bias 0 at every step</p>", svg::escape(run.name),
                       svg::escape(layer));
  if (experts.empty()) {
    c.series = {lo, hi};
  } else {
    for (auto& [e, s] : experts) c.series.push_back(std::move(s));
  }
  return svg::render(c);
}

std::string moe_section(const std::vector<RunData>& runs) {
  std::string out;
  svg::LineChart mean = chart("max-vio-mean", "MaxVio, mean over the MoE layers", "MaxVio");
  for (size_t i = 0; i < runs.size(); ++i) {
    svg::Series s{runs[i].name, svg::palette(i), {}};
    for (const auto& rec : runs[i].steps) {
      if (!rec.contains("moe") || rec["moe"].empty()) continue;
      double sum = 0;
      for (const auto& l : rec["moe"]) sum += num(l, "max_vio");
      s.points.emplace_back(num(rec, "step"), sum / static_cast<double>(rec["moe"].size()));
    }
    if (!s.points.empty()) mean.series.push_back(std::move(s));
  }
  if (mean.series.empty()) return "<p>No MoE layer metrics in these runs.</p>\n";
  out += svg::render(mean);
  for (const RunData& run : runs) {
    const std::vector<std::string> layers = moe_layers(run);
    if (layers.empty()) continue;
    out += fmt::format("<h3>{}</h3>\n", svg::escape(run.name));
    svg::LineChart vio = chart("max-vio/" + run.name, run.name + ": MaxVio per MoE layer", "MaxVio");
    for (size_t k = 0; k < layers.size(); ++k) {
      svg::Series s{layers[k], svg::palette(k), {}};
      for (const auto& rec : run.steps)
        if (const json* l = layer_of(rec, layers[k])) s.points.emplace_back(num(rec, "step"), num(*l, "max_vio"));
      vio.series.push_back(std::move(s));
    }
    out += svg::render(vio);
    for (const auto& layer : layers) {
      const std::string map = load_heatmap(run, layer);
      out += "<div class=\"row\">" + (map.empty() ? "" : map) + bias_chart(run, layer) + "</div>\n";
    }
  }
  return out;
}

}  // namespace

RunData read_run(const std::string& dir) {
  if (!fs::is_directory(dir)) throw std::runtime_error(fmt::format("{}: not a directory", dir));
  RunData run;
  run.dir = dir;
  run.name = fs::path(dir).lexically_normal().filename().string();
  if (run.name.empty()) run.name = fs::path(dir).lexically_normal().parent_path().filename().string();
  const fs::path metrics = fs::path(dir) / "metrics.jsonl";
  if (!fs::exists(metrics))
    throw std::runtime_error(
        fmt::format("{}: not found: {} is not a run directory, or its run stopped before its "
                    "first step (rank 0 writes a record per step)",
                    metrics.string(), dir));
  std::ifstream in(metrics);
  if (!in) throw std::runtime_error(fmt::format("{}: cannot read", metrics.string()));
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].empty()) continue;
    json j = json::parse(lines[i], nullptr, /*allow_exceptions=*/false);
    const bool valid = !j.is_discarded() && j.is_object() && j.contains("step") && j["step"].is_number_integer();
    if (!valid && i + 1 == lines.size()) {
      run.notes.push_back(
          fmt::format("{}:{}: the last line is not a whole record (the run was stopped while writing "
                      "it?); left out",
                      metrics.string(), i + 1));
      break;
    }
    if (!valid)
      throw std::runtime_error(fmt::format("{}:{}: not a metrics record (a JSON object with an integer \"step\"): {}",
                                           metrics.string(), i + 1, lines[i].substr(0, 80)));
    if (j.contains("loss"))
      run.steps.push_back(std::move(j));
    else if (j.contains("val_loss"))
      run.evals.push_back(std::move(j));
  }
  if (run.steps.empty() && run.evals.empty())
    throw std::runtime_error(
        fmt::format("{}: no records: the run stopped before its first step was recorded", metrics.string()));

  run.checkpoint_root = (fs::path(dir) / "checkpoints").string();
  const fs::path config = fs::path(dir) / "config.yaml";
  if (fs::exists(config)) {
    run.config_text = read_text(config);
    try {
      run.checkpoint_root = checkpoints::checkpoint_root(config::load_config(config.string()), dir);
    } catch (const std::exception& e) {
      run.notes.push_back(fmt::format("{}: not read as a config ({}); checkpoints looked for in {}", config.string(),
                                      e.what(), run.checkpoint_root));
    }
  } else {
    run.notes.push_back(fmt::format("{}: not found; the report has no config for this run", config.string()));
  }
  run.checkpoints = checkpoints::committed_steps(run.checkpoint_root);
  return run;
}

std::string report_html(std::vector<RunData> runs) {
  if (runs.empty()) throw std::invalid_argument("report_html: no runs");
  // Runs of the same directory name are told apart by their paths.
  std::map<std::string, int> seen;
  for (const auto& r : runs) ++seen[r.name];
  for (auto& r : runs)
    if (seen[r.name] > 1) r.name = r.dir;

  std::string names;
  for (size_t i = 0; i < runs.size(); ++i)
    names += fmt::format("{}<span style=\"color:{}\">&#9632;</span> <b>{}</b> <code>{}</code>", i ? "<br/>" : "",
                         svg::palette(i), svg::escape(runs[i].name), svg::escape(runs[i].dir));
  std::string out = fmt::format(
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>moetrain report: {}</title>\n"
      "<style>body{{font-family:sans-serif;margin:1.5em;max-width:1180px}} svg{{margin:4px;background:#fff}}"
      " .row{{display:flex;flex-wrap:wrap;align-items:flex-start}} pre{{background:#f4f4f4;padding:8px;"
      "overflow-x:auto;font-size:12px}} .summary{{font-family:monospace;font-size:12px}} .note{{color:#a40}}"
      "</style></head><body>\n<h1>moetrain run report</h1>\n<p>{}</p>\n<h2>Summary</h2>\n",
      svg::escape(runs.size() == 1 ? runs[0].name : fmt::format("{} runs", runs.size())), names);
  for (const RunData& r : runs) {
    out += fmt::format("<p class=\"summary\"><b>{}</b>: {}</p>\n", svg::escape(r.name), svg::escape(summary_line(r)));
    for (const auto& note : r.notes) out += fmt::format("<p class=\"note\">{}</p>\n", svg::escape(note));
  }
  out +=
      "<p>Times are the steps' own (the report does not know the start-up and evaluation time); checkpoints are "
      "those kept in the checkpoint directory now.</p>\n";

  out += "<h2>Losses</h2>\n<div class=\"row\">" + loss_charts(runs) + "</div>\n";
  out += "<h2>Optimization and speed</h2>\n<div class=\"row\">";
  out += per_run_chart(runs, chart("lr", "Learning rate", "lr"), "lr");
  out += per_run_chart(runs, chart("grad-norm", "Gradient norm (before clipping)", "norm"), "grad_norm");
  out += per_run_chart(runs, chart("balance-loss", "Balance loss (auxiliary and sequence-wise)", "loss"),
                       "balance_loss", 1, /*nonzero=*/true);
  out += per_run_chart(runs, chart("tokens-per-s", "Throughput", "tokens/s"), "tokens_per_s");
  out += per_run_chart(runs, chart("mfu", "Model FLOPs utilization", "MFU (%)"), "mfu", 100);
  out += "</div>\n<h2>Expert load</h2>\n" + moe_section(runs);
  out += "<h2>Configs</h2>\n";
  for (const RunData& r : runs)
    out += fmt::format("<details><summary>{}</summary><pre>{}</pre></details>\n", svg::escape(r.name),
                       svg::escape(r.config_text.empty() ? "(no config.yaml)" : r.config_text));
  return out + "</body></html>\n";
}

std::string write_report(const std::vector<std::string>& dirs, const std::string& out) {
  if (dirs.empty()) throw std::invalid_argument("report: name at least one run directory");
  std::vector<RunData> runs;
  std::string said;
  for (const auto& d : dirs) {
    runs.push_back(read_run(d));
    for (const auto& note : runs.back().notes) said += "note: " + note + "\n";
  }
  size_t records = 0;
  for (const auto& r : runs) records += r.steps.size() + r.evals.size();
  const size_t n = runs.size();
  const std::string html = report_html(std::move(runs));
  const fs::path tmp = out + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << html;
    f.flush();
    if (!f) throw std::runtime_error(fmt::format("{}: cannot write the report", out));
  }
  std::error_code ec;
  fs::rename(tmp, out, ec);
  if (ec) throw std::runtime_error(fmt::format("{}: cannot write the report: {}", out, ec.message()));
  return said + fmt::format("wrote {} ({} run{}, {} records, {:.0f} KiB)\n", out, n, n == 1 ? "" : "s", records,
                            static_cast<double>(html.size()) / 1024.0);
}

}  // namespace moetrain::trainer
