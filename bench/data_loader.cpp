// bench/data_loader: how fast the shard loader delivers training tokens, next to how fast the model consumes them,
// measured in the same run. A synthetic corpus is written as token shards to a temporary directory; the config
// (default: configs/tiny.yaml on one process) trains on them with trainer::Trainer for a few steps; then the
// loader alone (ShardBatches, no prefetch) serves micro-batches of the same shape as fast as it can. The ratio is
// the headroom: the loader must stay well ahead (≥ 20×) so the training loop never waits on data. Last, the
// prefetching wrapper is driven at the training pace to show how long the loop waits for a batch.
//
//   data_loader [--config configs/tiny.yaml] [--steps 10] [--corpus-tokens 4000000] [--set key=value ...]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "config/loader.h"
#include "cli/cli.h"
#include "bench/timing.h"
#include "data/builder.h"
#include "data/prefetch.h"
#include "data/shard_batches.h"
#include "trainer/train.h"

using moetrain::bench::Clock;
using moetrain::bench::since;

int main(int argc, char** argv) {
  using namespace moetrain;
  CLI::App app{"Loader tokens/s vs training tokens/s of one config, measured in the same run"};
  std::string file = "configs/tiny.yaml";
  int64_t steps = 10;
  uint64_t corpus_tokens = 4000000;
  std::vector<std::string> overrides;
  app.add_option("--config", file, "Config (default configs/tiny.yaml, run on one process)");
  app.add_option("--steps", steps, "Timed training steps (after 2 warm-up steps)");
  app.add_option("--corpus-tokens", corpus_tokens, "Tokens of the synthetic corpus written as shards");
  cli::add_set_option(&app, overrides);
  CLI11_PARSE(app, argc, argv);

  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / fmt::format("moetrain_data_loader_{}", ::getpid());
  int rc = 0;
  try {
    std::vector<std::string> o = {"parallel.pp=1", "parallel.dp=1", "parallel.ep=1", "data.source=shards",
                                  "data.path=" + (dir / "synth").string()};
    o.insert(o.end(), overrides.begin(), overrides.end());
    config::Config c = config::load_config(file, {o, 0});

    data::SynthOptions synth;
    synth.out = (dir / "synth").string();
    synth.tokens = corpus_tokens;
    synth.vocab_size = c.model.vocab_size;
    synth.document_tokens = 1023;
    synth.progress = false;
    const data::SynthSummary s = data::synth_shards(synth);
    fmt::print("corpus: {} tokens in {} documents (synthetic, vocabulary {}), shards under {}\n", s.tokens,
               s.documents, c.model.vocab_size, dir.string());

    const data::BatchShape shape = data::BatchShape::from(c);
    const double tokens_per_step = static_cast<double>(shape.global_sequences() * c.train.seq_len);
    fmt::print("shape: {} sequences/step ({} micro-batches of {}), seq_len {}, window {} tokens\n",
               shape.global_sequences(), shape.micro_batches, shape.micro_batch_size, c.train.seq_len, shape.window);

    // Training: the real loop (its prefetching source included), a few steps after a warm-up.
    trainer::Trainer trainer(c, nullptr, "", false);
    for (int i = 0; i < 2; ++i) trainer.step();
    auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) trainer.step();
    const double train_s = since(t0);
    const double train_tps = tokens_per_step * static_cast<double>(steps) / train_s;

    // The loader alone: every micro-batch of consecutive steps, synchronously, for at least a second.
    data::ShardBatches loader(c);
    int64_t served = 0, step = 0;
    t0 = Clock::now();
    double load_s = 0;
    do {
      for (int64_t mb = 0; mb < shape.micro_batches; ++mb) {
        at::Tensor batch = loader.train(step, 0, mb);
        served += batch.size(0);
      }
      ++step;
      load_s = since(t0);
    } while (load_s < 1.0);
    const double load_tps = static_cast<double>(served * c.train.seq_len) / load_s;

    // The prefetching wrapper at the training pace: the loop's compute per micro-batch, then the next request.
    const double per_mb = train_s / static_cast<double>(steps * shape.micro_batches);
    const int64_t requests = std::min<int64_t>(200, std::max<int64_t>(20, static_cast<int64_t>(2.0 / per_mb)));
    data::PrefetchingSource prefetch(std::make_unique<data::ShardBatches>(c), std::max<int64_t>(1, c.data.prefetch),
                                     shape);
    for (int64_t i = 0; i < requests; ++i) {
      prefetch.train(i / shape.micro_batches, 0, i % shape.micro_batches);
      std::this_thread::sleep_for(std::chrono::duration<double>(per_mb));
    }
    const auto st = prefetch.stats();

    fmt::print("\n{:<34} {:>14}\n", "", "tokens/s");
    fmt::print("{:<34} {:>14.0f}\n", fmt::format("training ({} steps)", steps), train_tps);
    fmt::print("{:<34} {:>14.0f}\n", "loader (synchronous, one thread)", load_tps);
    fmt::print("\nloader / training: {:.0f}× (needs ≥ 20×: {})\n", load_tps / train_tps,
               load_tps / train_tps >= 20 ? "yes" : "NO");
    fmt::print("prefetch (depth {}) at the training pace ({:.1f} ms per micro-batch): {} requests, {} ready, {} "
               "waited, {} served synchronously; mean wait {:.1f} µs per request (the first, synchronous one "
               "included)\n",
               std::max<int64_t>(1, c.data.prefetch), per_mb * 1e3, requests, st.ready, st.waited, st.unpredicted,
               st.wait_s / static_cast<double>(requests) * 1e6);
  } catch (const std::exception& e) {
    fmt::print(stderr, "data_loader: error: {}\n", e.what());
    rc = 1;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return rc;
}
