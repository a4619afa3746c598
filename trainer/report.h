// `moetrain report RUN [RUN ...] --out report.html`: one self-contained HTML page (inline SVG, no scripts, nothing
// fetched) of one or more run directories, overlaid: the summary of each run, train and validation loss with the
// corpus entropy floor, LM and MTP losses, learning rate, gradient norm, tokens/s, MFU, MaxVio, the expert-load
// heatmaps (share of each expert's tokens, per MoE layer, over steps), the balancer's bias trajectories and each
// run's config.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moetrain::trainer {

// What a run directory holds, read back.
struct RunData {
  std::string dir, name;              // name: what the report calls it (the directory's name, made unique)
  std::string config_text;            // config.yaml as written ("" when absent)
  std::vector<nlohmann::json> steps;  // the step records of metrics.jsonl, in order
  std::vector<nlohmann::json> evals;  // its validation records
  std::string checkpoint_root;        // where the run's checkpoints go
  std::vector<int64_t> checkpoints;   // the committed ones found there (step_N directories), by step
  std::vector<std::string> notes;     // what could not be read and was left out (a torn last line)
};

// Throws, naming the file and line, when `dir` is not a directory, has no metrics.jsonl, holds no record, or has a
// line before the last that is not a record; a last line cut short (a run killed while writing it) is left out
// with a note.
RunData read_run(const std::string& dir);

// The page for runs read by read_run (at least one).
std::string report_html(std::vector<RunData> runs);

// Reads the runs, writes the page to `out` (throws when it cannot); returns what to print: the file written and
// the notes.
std::string write_report(const std::vector<std::string>& dirs, const std::string& out);

}  // namespace moetrain::trainer
