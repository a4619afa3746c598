#include "cli/cli.h"

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <optional>

#include "checkpoints/checkpoint.h"
#include "checkpoints/interop.h"
#include "data/tokenizer.h"
#include "trainer/evaluate.h"
#include "config/loader.h"
#include "config/schema.h"
#include "data/cli.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_runtime.h"
#include "cli/plan.h"
#include "trainer/preemption.h"
#include "trainer/report.h"
#include "trainer/train.h"
#include "cli/version.h"

namespace moetrain::cli {
namespace {

struct ConfigArgs {
  std::string file;
  std::vector<std::string> overrides;
};

void add_config_args(CLI::App* cmd, ConfigArgs& args) {
  cmd->add_option("FILE", args.file, "YAML experiment config")->required();
  add_set_option(cmd, args.overrides);
}

config::Config load(const ConfigArgs& args, const parallel::MpiRuntime& mpi) {
  config::LoadOptions options;
  options.overrides = args.overrides;
  options.launch_world_size = mpi.active() ? mpi.size() : 0;
  config::Config c = config::load_config(args.file, options);
  check_plan_counts(c);  // parameter counts are the model's formulas, which config/ cannot call
  check_memory_budget(make_plan(c), c);
  return c;
}

// CLI11 takes an unknown command for a stray positional ("a subcommand is required") and answers
// `moetrain eval --help` with the main help; name it instead: the first non-option word at each level that has
// commands must be one of them.
void check_command_names(const CLI::App& app, int argc, char** argv) {
  const CLI::App* level = &app;
  std::string words;  // the commands so far: "", "config", "ckpt"
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto subs = level->get_subcommands([](const CLI::App*) { return true; });
    if (subs.empty() || arg.rfind('-', 0) == 0) return;
    auto it = std::find_if(subs.begin(), subs.end(), [&](const CLI::App* s) { return s->get_name() == arg; });
    const std::string prefix = words.empty() ? "" : words + " ";
    if (it == subs.end()) {
      std::string names;
      for (const CLI::App* s : subs) names += (names.empty() ? "" : ", ") + s->get_name();
      throw std::runtime_error(fmt::format("unknown command '{}{}'; {}commands: {} (see moetrain {}--help)", prefix,
                                           arg, prefix, names, prefix));
    }
    level = *it;
    words = prefix + arg;
  }
}

// Output of a command: printed once, by rank 0.
void emit(const parallel::MpiRuntime& mpi, const std::string& text) {
  if (mpi.rank() == 0) {
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
  }
}

}  // namespace

CLI::Option* add_set_option(CLI::App* app, std::vector<std::string>& overrides) {
  return app->add_option("--set", overrides, "Override a config key: --set section.key=value (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->type_name("KEY=VALUE");
}

int run_main(int argc, char** argv) {
  parallel::MpiRuntime mpi(&argc, &argv);

  CLI::App app{"moetrain: DeepSeek-V3-style Mixture-of-Experts pre-training on LibTorch", "moetrain"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every command");

  ConfigArgs check_args, show_args, plan_args;
  bool show_origins = false, plan_as_json = false;

  CLI::App* config_cmd = app.add_subcommand("config", "Check, show and document experiment configs");
  config_cmd->require_subcommand(1);
  CLI::App* check = config_cmd->add_subcommand(
      "check", "Validate a config (types, ranges, layout); with mpirun also against the launched ranks");
  add_config_args(check, check_args);
  CLI::App* show = config_cmd->add_subcommand("show", "Print the resolved config (bases, overrides and "
                                                      "defaults applied) as YAML");
  add_config_args(show, show_args);
  show->add_flag("--origins", show_origins, "Comment each value with the file:line or --set it came from");
  CLI::App* reference = config_cmd->add_subcommand("reference", "Print the config reference (every key, type, "
                                                                "default and meaning) as Markdown");

  CLI::App* plan_cmd = app.add_subcommand(
      "plan", "Parameters, FLOPs per token and per-rank memory of a config under its layout and precision");
  add_config_args(plan_cmd, plan_args);
  plan_cmd->add_flag("--json", plan_as_json, "Print the plan as JSON");

  CLI::App* version_cmd = app.add_subcommand("version", "Versions of moetrain and the libraries it uses");

  ConfigArgs train_args;
  bool overwrite = false;
  CLI::App* train_cmd = app.add_subcommand(
      "train", "Train: writes the resolved config, metrics.jsonl and logs to logging.dir/logging.name");
  train_cmd->add_option("--config", train_args.file, "YAML experiment config")->required();
  add_set_option(train_cmd, train_args.overrides);
  train_cmd->add_flag("--overwrite", overwrite, "Replace the metrics of an earlier run in the same run directory");
  std::string resume, init_from;
  train_cmd->add_option("--init-from", init_from,
                        "Start from a checkpoint's weights (step 0, fresh optimizer and data order; any layout): sets "
                        "checkpoint.init_from");
  train_cmd->add_option("--resume", resume,
                        "Continue from a checkpoint: auto (the run's latest checkpoint, or a fresh start if there is "
                        "none) or a checkpoint directory");
  int exit_code_on_stop = 0;
  train_cmd
      ->add_option("--exit-code-on-stop", exit_code_on_stop,
                   "Exit status when the run stopped before train.steps after saving a checkpoint (a stop signal or "
                   "train.exit_duration_mins), so that a launcher can tell it from a finished run: the Slurm template "
                   "passes 75 and requeues the job on it (default 0)")
      ->check(CLI::Range(0, 255));
  bool stopped_early = false;

  std::string ckpt_dir, export_out, export_format = "h5", export_dtype = "fp32", import_config, import_out;
  double export_shard_gb = 5.0;
  CLI::App* ckpt_cmd = app.add_subcommand("ckpt", "Inspect, verify and export sharded HDF5 checkpoints");
  ckpt_cmd->require_subcommand(1);
  CLI::App* ckpt_inspect = ckpt_cmd->add_subcommand("inspect", "Table of the tensors: shape, dtype, bytes, shard");
  CLI::App* ckpt_verify = ckpt_cmd->add_subcommand("verify", "Read every tensor and check every checksum");
  CLI::App* ckpt_export = ckpt_cmd->add_subcommand(
      "export",
      "The model weights without optimizer state: one HDF5 file under their global names (--format h5), or a Hugging "
      "Face transformers DeepseekV3 folder (--format hf: config.json and safetensors)");
  CLI::App* ckpt_import = ckpt_cmd->add_subcommand(
      "import", "A new checkpoint (weights only, step 0) from a Hugging Face transformers DeepseekV3 folder, for "
                "train --init-from");
  ckpt_import->add_option("DIR", ckpt_dir, "The transformers folder (config.json, safetensors)")->required();
  ckpt_import->add_option("--format", export_format, "hf")->check(CLI::IsMember({"hf"}))->required();
  ckpt_import->add_option("--config", import_config, "The experiment config of the model it holds")->required();
  ckpt_import->add_option("--out", import_out, "The new checkpoint directory")->required();
  for (CLI::App* sub : {ckpt_inspect, ckpt_verify, ckpt_export})
    sub->add_option("DIR", ckpt_dir, "A checkpoint step directory, or a checkpoint directory with `latest`")
        ->required();
  ckpt_export->add_option("--out", export_out, "The HDF5 file (h5) or the new folder (hf) to write")->required();
  ckpt_export->add_option("--format", export_format, "h5 or hf")->check(CLI::IsMember({"h5", "hf"}));
  ckpt_export->add_option("--dtype", export_dtype, "hf: the weights' dtype, fp32 or bf16")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  ckpt_export->add_option("--shard-gb", export_shard_gb, "hf: the most GB of weights per safetensors file")
      ->check(CLI::PositiveNumber);

  trainer::EvalOptions eval_opts;
  CLI::App* eval_cmd = app.add_subcommand(
      "eval", "A checkpoint's loss and perplexity on token shards (and per MTP depth, MaxVio per MoE layer), in one "
      "process or data parallel over the ranks mpirun launches");
  eval_cmd->add_option("CKPT", eval_opts.checkpoint, "A checkpoint step directory, or a checkpoint directory with `latest`")
      ->required();
  eval_cmd->add_option("--data", eval_opts.data, "Token shards' PREFIX (moetrain data build / data synth)")->required();
  eval_cmd->add_option("--windows", eval_opts.max_windows, "The most windows of seq_len tokens, read in order")
      ->check(CLI::PositiveNumber);
  eval_cmd->add_option("--batch", eval_opts.batch, "Windows per forward pass")->check(CLI::PositiveNumber);
  eval_cmd->add_option("--dump-logits", eval_opts.dump_logits,
                       "Write the main head's logits, [windows, seq_len, vocab] FP32, to this .npy file");

  trainer::GenerateOptions gen_opts;
  std::string gen_prompt, gen_tokenizer;
  std::vector<int64_t> gen_ids;
  CLI::App* gen_cmd = app.add_subcommand(
      "generate", "Continue a prompt with a checkpoint's model (one process, FP32, MLA's latent KV cache)");
  gen_cmd->add_option("CKPT", gen_opts.checkpoint, "A checkpoint step directory, or a checkpoint directory with `latest`")
      ->required();
  auto* ids_opt = gen_cmd->add_option("--prompt-ids", gen_ids, "The prompt as token ids (comma-separated)")
                      ->delimiter(',');
  auto* text_opt = gen_cmd->add_option("--prompt", gen_prompt, "The prompt as text (needs --tokenizer)");
  ids_opt->excludes(text_opt);
  gen_cmd->add_option("--tokenizer", gen_tokenizer, "A SentencePiece model: encodes --prompt, decodes the output, stops "
                                                     "at its end-of-document token");
  gen_cmd->add_option("--max-new-tokens", gen_opts.max_new_tokens, "Tokens to generate")->check(CLI::PositiveNumber);
  gen_cmd->add_option("--temperature", gen_opts.temperature, "0: greedy; else sampling at this temperature");
  gen_cmd->add_option("--top-p", gen_opts.top_p, "Nucleus sampling: the smallest set of top tokens reaching this mass");
  gen_cmd->add_option("--seed", gen_opts.seed, "The sampling generator's seed");
  gen_cmd->add_flag("--mtp", gen_opts.mtp,
                    "Speculative decoding: the MTP modules draft, the main model verifies (greedy); prints the "
                    "acceptance rate");

  std::vector<std::string> report_runs;
  std::string report_out = "report.html";
  CLI::App* report_cmd = app.add_subcommand(
      "report", "One self-contained HTML page (inline SVG plots) of one or more run directories, overlaid: losses and "
                "the entropy floor, learning rate, gradient norm, tokens/s, MFU, expert-load heatmaps, MaxVio, bias "
                "trajectories, config and summary");
  report_cmd->add_option("RUN", report_runs, "Run directories (logging.dir/logging.name)")->required();
  report_cmd->add_option("--out", report_out, "The HTML file to write (default report.html)");

  data::DataCommands data_cmds = data::add_data_commands(app);

  std::optional<std::string> error;
  try {
    try {
      check_command_names(app, argc, argv);
      app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
      emit(mpi, app.help());
      return mpi.finish(std::nullopt);
    } catch (const CLI::CallForAllHelp&) {
      emit(mpi, app.help("", CLI::AppFormatMode::All));
      return mpi.finish(std::nullopt);
    } catch (const CLI::ParseError& e) {
      // --help of a subcommand arrives here as CallForHelp thrown from inside it; CLI11 prints that itself.
      if (e.get_exit_code() == 0) {
        if (mpi.rank() == 0) app.exit(e);
        return mpi.finish(std::nullopt);
      }
      throw std::runtime_error(fmt::format("{} (see moetrain --help)", e.what()));
    }

    if (const auto why = mpi.thread_support_error()) throw std::runtime_error(*why);
    if (*check) {
      config::Config c = load(check_args, mpi);
      emit(mpi, fmt::format("{}: ok (world {} = pp {} × dp {}, ep {})\n", check_args.file, c.parallel.world_size,
                            c.parallel.pp, c.parallel.dp, c.parallel.ep));
    } else if (*show) {
      emit(mpi, config::to_yaml(load(show_args, mpi), show_origins));
    } else if (*reference) {
      emit(mpi, config::reference_markdown());
    } else if (*plan_cmd) {
      config::Config c = load(plan_args, mpi);
      Plan plan = make_plan(c);
      emit(mpi, plan_as_json ? plan_json(plan, c).dump(2) + "\n" : format_plan(plan, c));
    } else if (*version_cmd) {
      emit(mpi, version_report());
    } else if (*train_cmd) {
      if (!init_from.empty() && !resume.empty())
        throw std::runtime_error("--init-from and --resume: --resume continues a run, --init-from starts one from "
                                 "a checkpoint's weights; pass one");
      if (!init_from.empty()) train_args.overrides.push_back("checkpoint.init_from=" + init_from);
      config::Config c = load(train_args, mpi);
      const trainer::StopSignals listening(c.checkpoint.save_on_signal);  // from here on (trainer/preemption.h)
      if (!c.checkpoint.init_from.empty())  // a step directory, also where `latest` names it
        c.checkpoint.init_from = checkpoints::resolve_resume(c.checkpoint.init_from, c.checkpoint.init_from);
      check_fits_in_ram(make_plan(c), c, physical_ram_bytes());
      std::string run_dir = c.logging.dir + "/" + c.logging.name;
      trainer::RunDirectory::refuse_if_in_use(run_dir);  // before judging what a running job has written there
      const std::string resume_dir =
          resume.empty() ? "" : checkpoints::resolve_resume(checkpoints::checkpoint_root(c, run_dir), resume);
      // --resume auto without a checkpoint is a fresh start (a requeued job that failed before its first save).
      if (resume == "auto" && resume_dir.empty())
        emit(mpi, fmt::format("--resume auto: no checkpoint in {} yet; starting fresh\n",
                              checkpoints::checkpoint_root(c, run_dir)));
      if (resume_dir.empty() && resume != "auto" && !overwrite && std::filesystem::exists(run_dir + "/metrics.jsonl"))
        throw std::runtime_error(fmt::format("{}: a run already wrote metrics here; pass --overwrite to replace "
                                             "them or choose another --set logging.name=...",
                                             run_dir));
      std::unique_ptr<parallel::ProcessGroups> groups;
      if (mpi.active())
        groups = std::make_unique<parallel::ProcessGroups>(parallel::ProcessGroups::create(
            c.parallel, c.train.device == config::Device::kCuda ? parallel::Backend::kNccl : parallel::Backend::kMpi));
      trainer::Trainer trainer(c, groups.get(), run_dir, mpi.rank() == 0, resume_dir);
      trainer.run();
      stopped_early = trainer.steps_done() < c.train.steps;  // the same step on every rank (the stop vote)
    } else if (*ckpt_inspect) {
      emit(mpi, checkpoints::inspect(checkpoints::resolve_resume(ckpt_dir, ckpt_dir)));
    } else if (*ckpt_verify) {
      emit(mpi, checkpoints::verify(checkpoints::resolve_resume(ckpt_dir, ckpt_dir)) + "\n");
    } else if (*ckpt_import) {
      if (mpi.rank() == 0) emit(mpi, checkpoints::import_hf(ckpt_dir, import_config, import_out) + "\n");
    } else if (*ckpt_export) {
      const std::string dir = checkpoints::resolve_resume(ckpt_dir, ckpt_dir);
      if (mpi.rank() == 0)
        emit(mpi, (export_format == "hf" ? checkpoints::export_hf(dir, export_out,
                                                                  export_dtype == "bf16" ? at::kBFloat16 : at::kFloat,
                                                                  static_cast<int64_t>(export_shard_gb * 1e9))
                                         : checkpoints::export_weights(dir, export_out)) +
                      "\n");
    } else if (*eval_cmd) {
      eval_opts.checkpoint = checkpoints::resolve_resume(eval_opts.checkpoint, eval_opts.checkpoint);
      std::unique_ptr<parallel::MpiCommunicator> world;  // under mpirun: data parallel over the launched ranks
      if (mpi.active() && mpi.size() > 1) {
        std::vector<int64_t> all(static_cast<size_t>(mpi.size()));
        std::iota(all.begin(), all.end(), 0);
        world = std::make_unique<parallel::MpiCommunicator>("eval", MPI_COMM_WORLD, all, mpi.rank(),
                                                            config::ParallelConfig{}.comm_timeout_s);
        eval_opts.world = world.get();
      }
      const trainer::CheckpointEval result = trainer::evaluate(eval_opts);
      if (mpi.rank() == 0) emit(mpi, trainer::format(result));
    } else if (*gen_cmd) {
      gen_opts.checkpoint = checkpoints::resolve_resume(gen_opts.checkpoint, gen_opts.checkpoint);
      std::optional<data::Tokenizer> tok;
      if (!gen_tokenizer.empty()) tok.emplace(gen_tokenizer);
      if (!gen_prompt.empty()) {
        if (!tok) throw std::runtime_error("--prompt needs --tokenizer (or pass --prompt-ids)");
        std::vector<int> ids;
        tok->encode(gen_prompt, ids);
        gen_ids.assign(ids.begin(), ids.end());
      }
      if (gen_ids.empty()) throw std::runtime_error("generate: pass --prompt-ids or --prompt");
      gen_opts.prompt = gen_ids;
      if (tok) gen_opts.stop_id = tok->eos_id();
      if (mpi.rank() == 0) {
        const trainer::Generated g = trainer::generate(gen_opts);
        std::string line = fmt::format("prompt: {}\ngenerated: {}\n", fmt::join(gen_opts.prompt, " "),
                                       fmt::join(g.tokens, " "));
        if (tok) line += fmt::format("text: {}\n", tok->decode(std::vector<int>(g.tokens.begin(), g.tokens.end())));
        line += fmt::format("{} tokens in {:.2f} s ({:.1f} tokens/s)\n", g.tokens.size(), g.seconds,
                            static_cast<double>(g.tokens.size()) / std::max(g.seconds, 1e-9));
        if (gen_opts.mtp)
          line += fmt::format("MTP drafts accepted: {} of {} ({:.1f}%)\n", g.accepted, g.drafted,
                              g.drafted > 0 ? 100.0 * static_cast<double>(g.accepted) / static_cast<double>(g.drafted)
                                            : 0.0);
        emit(mpi, line);
      }
    } else if (*report_cmd) {
      if (mpi.rank() == 0) emit(mpi, trainer::write_report(report_runs, report_out));
    } else if (data_cmds.selected()) {
      if (mpi.rank() == 0) data::run_data_command(data_cmds);  // one writer of the files
    }
  } catch (const c10::Error& e) {
    // LibTorch's what() carries a C++ backtrace; the message is its first line.
    const std::string what = e.what_without_backtrace();
    error = what.substr(0, what.find('\n'));
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown error";
  }
  const int rc = mpi.finish(error);
  return rc == 0 && stopped_early ? exit_code_on_stop : rc;
}

}  // namespace moetrain::cli
