// The trainer's components: progress lines after a resume, the peak FLOP/s on the trained device, evaluation
// intervals, what a save copies to the host, and the device choice.
#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <c10/core/CPUAllocator.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <map>
#include <fstream>

#include "checkpoints/checkpointer.h"
#include "config/loader.h"
#include "model/param_roles.h"
#include "parallel/placement.h"
#include "precision/weight_cache.h"
#include "trainer/event_file.h"
#include "trainer/memory_meter.h"
#include "trainer/metrics.h"
#include "trainer/run_dir.h"
#include "trainer/train.h"

namespace moetrain::trainer {
namespace {
namespace fs = std::filesystem;

config::Config tiny(std::vector<std::string> extra = {}) {
  std::vector<std::string> o{"parallel.pp=1", "parallel.dp=1", "parallel.ep=1", "train.peak_flops=1e9"};
  o.insert(o.end(), extra.begin(), extra.end());
  return config::load_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml", {o, 0});
}

fs::path temp_dir(const std::string& what) {
  fs::path d = fs::temp_directory_path() / ("moetrain-" + what + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A process resumed at step 40 of 100 (logging every 25): its first step prints, and the ETA extrapolates from the
// steps this process trained, not from the absolute step.
TEST(Progress, AfterAResume) {
  config::Config c = tiny({"train.steps=100", "logging.interval=25"});
  const Progress p(c, /*first_step=*/40);
  EXPECT_TRUE(p.due(41));  // the first step of this process
  EXPECT_FALSE(p.due(42));
  EXPECT_TRUE(p.due(50));
  EXPECT_TRUE(p.due(100));
  EXPECT_DOUBLE_EQ(p.eta_s(50, 20.0), 2.0 * 50);  // 10 steps in 20 s, 50 to go
  EXPECT_LT(p.eta_s(40, 0.0), 0);                 // nothing trained yet: unknown
  const Progress fresh(c, 0);
  EXPECT_TRUE(fresh.due(1));
  EXPECT_DOUBLE_EQ(fresh.eta_s(50, 20.0), 20.0);
}

// The peak is measured on the device asked for: a meta-device matmul does no arithmetic, so its "peak" is far
// above the CPU's; a CPU-only measurement would give the same figure for both.
TEST(PeakFlops, MeasuredOnTheGivenDevice) {
  const double cpu = measure_peak_flops(c10::Device(c10::kCPU));
  EXPECT_GT(cpu, 0);
  EXPECT_GT(measure_peak_flops(c10::Device(c10::kMeta)), 100 * cpu);
}

TEST(Placement, CudaWithoutAGpuIsAClearError) {
  config::Config c = tiny({"train.device=cuda"});
  if (torch::cuda::is_available()) {
    EXPECT_TRUE(parallel::local_device(nullptr, c).is_cuda());
    if (torch::cuda::device_count() >= 2) {  // the device of local rank 1 made current (0 is current anyway)
      const c10::Device d = parallel::use_cuda_device(1, "test");
      EXPECT_EQ(d.index(), 1);
      EXPECT_EQ(c10::impl::getDeviceGuardImpl(c10::kCUDA)->getDevice(), d);
      parallel::use_cuda_device(0, "test");
    }
    return;
  }
  try {
    parallel::local_device(nullptr, c);
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("train.device = cuda but no CUDA device is visible"), std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(parallel::local_device(nullptr, tiny()).is_cpu());
}

// train.deterministic switches LibTorch's deterministic kernels on for the process, and a trainer without it switches
// them off. On the CPU, where moetrain's kernels are deterministic anyway, nothing changes: the same losses bit for
// bit in fp32 and bf16 (memory filled before its first use included: nothing reads memory it did not write).
TEST(Trainer, DeterministicKernelsChangeNothingOnTheCpu) {
  for (const std::string mode : {"fp32", "bf16"}) {
    std::vector<double> losses;
    {
      trainer::Trainer on(tiny({"train.deterministic=true", "precision.mode=" + mode}), nullptr, "", false);
      EXPECT_TRUE(at::globalContext().deterministicAlgorithms());
      for (int s = 0; s < 3; ++s) losses.push_back(on.step().loss);
    }
    trainer::Trainer off(tiny({"precision.mode=" + mode}), nullptr, "", false);
    EXPECT_FALSE(at::globalContext().deterministicAlgorithms());
    for (int s = 0; s < 3; ++s) {
      const double loss = off.step().loss;
      EXPECT_TRUE(std::isfinite(loss)) << mode;
      EXPECT_EQ(loss, losses[static_cast<size_t>(s)]) << mode << " step " << s + 1;
    }
  }
}

// train.eval_interval 0 means never, the last step included.
TEST(Trainer, EvalIntervalZeroNeverEvaluates) {
  const fs::path dir = temp_dir("eval0");
  for (const std::string interval : {"0", "2"}) {
    Trainer t(tiny({"train.steps=2", "train.eval_interval=" + interval, "train.eval_batches=1"}), nullptr,
              (dir / interval).string(), /*main=*/true);
    t.run();
    std::ifstream in(dir / interval / "metrics.jsonl");
    int evals = 0;
    for (std::string line; std::getline(in, line);) evals += line.find("val_loss") != std::string::npos;
    EXPECT_EQ(evals, interval == "0" ? 0 : 1) << "eval_interval " << interval;
  }
  fs::remove_all(dir);
}

// The counting CPU allocator: a tensor's bytes are live until it is freed, the peak keeps the most, a reset starts
// a new peak at what is live.
TEST(MemoryMeter, CountsLiveTensorBytesAndTheirPeak) {
  count_cpu_tensors();
  ASSERT_TRUE(cpu_tensors_counted());
  const c10::Device cpu(c10::kCPU);
  reset_tensor_memory_peak(cpu);
  const int64_t before = tensor_memory(cpu).live_bytes;
  {
    at::Tensor a = at::empty({1000}, at::kFloat);
    at::Tensor b = at::empty({500}, at::kDouble);
    EXPECT_EQ(tensor_memory(cpu).live_bytes, before + 4000 + 4000);
  }
  EXPECT_EQ(tensor_memory(cpu).live_bytes, before);
  EXPECT_EQ(tensor_memory(cpu).peak_bytes, before + 8000);
  // The raw interface (oneDNN's BF16 GEMMs use it) is counted too, and frees through the same deleter.
  c10::Allocator* alloc = c10::GetCPUAllocator();
  void* raw = alloc->raw_allocate(300);
  EXPECT_EQ(tensor_memory(cpu).live_bytes, before + 300);
  alloc->raw_deallocate(raw);
  EXPECT_EQ(tensor_memory(cpu).live_bytes, before);
  {
    const at::Tensor x = at::randn({64, 64}).to(at::kBFloat16);
    EXPECT_TRUE(at::matmul(x, x).to(at::kFloat).isfinite().all().item<bool>());
  }
  reset_tensor_memory_peak(cpu);
  EXPECT_EQ(tensor_memory(cpu).peak_bytes, before);
  const std::vector<double> peaks = peak_bytes_per_rank(cpu, 0, 1, [](at::Tensor&) {});
  ASSERT_EQ(peaks.size(), 1u);
  EXPECT_EQ(peaks[0], static_cast<double>(before));
}

// Every step records each rank's peak of live tensor bytes; at least the weights, their gradients and AdamW's two
// moments (4 × 4 bytes per parameter in FP32) are live at once, and the first progress line shows it.
TEST(Trainer, RecordsThePeakMemoryOfEachStep) {
  const fs::path dir = temp_dir("peakmem");
  config::Config c = tiny({"train.steps=2", "train.eval_interval=0"});
  Trainer t(c, nullptr, (dir / "r").string(), /*main=*/true);
  t.run();
  std::ifstream in(dir / "r" / "metrics.jsonl");
  int64_t params = 0;
  for (const auto& p : t.model()->parameters()) params += p.numel();
  int steps = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    ASSERT_TRUE(j.contains("peak_mem_bytes")) << line;
    ASSERT_EQ(j["peak_mem_bytes"].size(), 1u);
    const double peak = j["peak_mem_bytes"][0].get<double>();
    if (j["step"] == 2) {
      EXPECT_GE(peak, 16.0 * static_cast<double>(params));
    }
    EXPECT_LT(peak, 64.0 * 1024 * 1024) << "a tiny model's step";
    ++steps;
  }
  EXPECT_EQ(steps, 2);
  StepResult r;
  r.peak_memory_bytes = {1024.0 * 1024.0, 3 * 1024.0 * 1024.0};
  EXPECT_NE(Progress(c, 0).line(r, 1.0).find("| peak mem 3.0 MiB (rank 1)"), std::string::npos);
  r.step = 1;
  EXPECT_EQ(Progress(c, 0).line(r, 1.0).find("peak mem"), std::string::npos) << "only on the first line";
  fs::remove_all(dir);
}

// A rank copies to the host only the tensors it writes: here dp rank 1 of 2 (one process standing in for it),
// which writes about half of the replicated tensors.
TEST(Checkpointer, CopiesOnlyWhatThisRankWrites) {
  const fs::path dir = temp_dir("ckpt-copy");
  config::Config c = tiny({"checkpoint.async=true"});
  model::Transformer m(c.model, model::StageSpec::whole(c.model));
  model::init_parameters(*m, 1, c.model.init_std);
  std::vector<checkpoints::StateTensor> state;
  int64_t total = 0;
  for (const auto& p : model::parameter_roles(*m)) {
    state.push_back({"model/", p, p.tensor});
    total += static_cast<int64_t>(p.tensor.nbytes());
  }
  parallel::ControlPlane one;
  checkpoints::TrainerState s;
  checkpoints::Checkpointer all(c, (dir / "all").string(), one, nullptr, state, false);
  all.save(s);
  all.settle();
  EXPECT_EQ(all.last_save().host_bytes_copied, all.last_save().bytes_written);
  EXPECT_GT(all.last_save().bytes_written, total);  // everything, plus the RNG state and the step

  c.parallel.dp = 2;
  c.parallel.world_size = 2;
  const parallel::Coords second{0, 1, 1, 0};  // pp 0, dp 1, edp 1, ep 0
  checkpoints::Checkpointer half(c, (dir / "half").string(), one, &second, state, false);
  half.save(s);
  half.settle();
  EXPECT_EQ(half.last_save().host_bytes_copied, half.last_save().bytes_written);
  EXPECT_GT(half.last_save().bytes_written, 0);
  EXPECT_LT(half.last_save().bytes_written, total);
  fs::remove_all(dir);
}


// A full disk: the metrics line is not dropped in silence.
TEST(MetricsWriter, AFailedWriteIsAnError) {
  MetricsWriter w("/dev/full");
  try {
    w.write({{"step", 1}});
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "/dev/full: cannot write metrics: No space left on device");
  }
}

bool all_finite(Trainer& t) {
  for (const auto& p : t.model()->parameters())
    if (!at::isfinite(p).all().item<bool>()) return false;
  for (const auto& b : t.model()->buffers())
    if (!at::isfinite(b).all().item<bool>()) return false;
  return true;
}

// A learning rate of 1e3 without clipping drives the gradient norm to NaN within a few steps: the run stops there
// with the step named, and the update is never applied.
TEST(Divergence, ANonFiniteStepStopsTheRunBeforeItsUpdate) {
  Trainer t(tiny({"train.lr=1e3", "train.grad_clip=0", "train.warmup_steps=0", "train.steps=20"}), nullptr, "", false);
  std::string error;
  int64_t steps = 0;
  try {
    for (; steps < 20; ++steps) t.step();
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  ASSERT_LT(steps, 20) << "the run did not diverge";
  EXPECT_EQ(error.rfind(fmt::format("step {}: the ", steps + 1), 0), 0u) << error;
  EXPECT_NE(error.find("is not finite"), std::string::npos) << error;
  EXPECT_NE(error.find("first non-finite gradient: "), std::string::npos) << error;
  EXPECT_NE(error.find("train.skip_nonfinite_steps = 0"), std::string::npos) << error;
  EXPECT_TRUE(all_finite(t));
  EXPECT_EQ(t.steps_done(), steps);
}

TEST(Divergence, SkipsUpToTheLimitInARow) {
  Trainer t(tiny({"train.lr=1e3", "train.grad_clip=0", "train.warmup_steps=0", "train.steps=40",
                  "train.skip_nonfinite_steps=2"}),
            nullptr, "", false);
  int skipped_in_a_row = 0, most = 0;
  std::string error;
  try {
    for (int s = 0; s < 40; ++s) {
      const StepResult r = t.step();
      skipped_in_a_row = r.skipped ? skipped_in_a_row + 1 : 0;
      most = std::max(most, skipped_in_a_row);
      EXPECT_EQ(r.skipped, !std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) << "step " << s;
    }
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  EXPECT_GE(most, 1);
  EXPECT_LE(most, 2);
  if (!error.empty()) {
    EXPECT_EQ(most, 2);
    EXPECT_NE(error.find("after 3 such steps in a row (train.skip_nonfinite_steps = 2)"), std::string::npos) << error;
  }
  EXPECT_TRUE(all_finite(t));
}

// A state with a NaN is never saved: the save fails on every rank before writing, and nothing becomes `latest`.
TEST(Checkpointer, RefusesANonFiniteState) {
  const fs::path dir = temp_dir("ckpt-nan");
  config::Config c = tiny();
  model::Transformer m(c.model, model::StageSpec::whole(c.model));
  model::init_parameters(*m, 1, c.model.init_std);
  std::vector<checkpoints::StateTensor> state;
  for (const auto& p : model::parameter_roles(*m)) state.push_back({"model/", p, p.tensor});
  {
    at::NoGradGuard g;
    m->layers[1]->attn_norm->weight[3] = std::nan("");
  }
  parallel::ControlPlane one;
  checkpoints::Checkpointer ck(c, (dir / "ck").string(), one, nullptr, state, false);
  checkpoints::TrainerState s;
  s.step = 7;
  try {
    ck.save(s);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "checkpoint of step 7 refused: tensor model/layers.1.attn_norm.weight on rank 0 "
                                     "is not finite (NaN or inf); the previous checkpoint in " +
                                         (dir / "ck").string() + " stays current");
  }
  EXPECT_FALSE(fs::exists(dir / "ck" / "latest"));
  fs::remove_all(dir);
}


// Two jobs never share a run directory; the lock goes with the process that held it.
TEST(RunDirectory, OneJobAtATime) {
  const fs::path dir = temp_dir("lock");
  parallel::ControlPlane one;
  {
    RunDirectory a((dir / "run").string(), /*main=*/true, one);
    try {
      RunDirectory b((dir / "run").string(), true, one);
      FAIL() << "a second job took the lock";
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(fmt::format("{}: the run directory is in use by another job (pid {} on ",
                                                        (dir / "run").string(), ::getpid()),
                                            0),
                0u)
          << e.what();
    }
  }
  RunDirectory again((dir / "run").string(), true, one);
  EXPECT_EQ(again.stale_holder(), "");
  fs::remove_all(dir);
}

TEST(RunDirectory, NamesALockLeftByADeadProcess) {
  const fs::path dir = temp_dir("stale");
  fs::create_directories(dir / "run");
  std::ofstream(dir / "run" / ".lock") << "pid 999999 on elsewhere\n";
  parallel::ControlPlane one;
  RunDirectory r((dir / "run").string(), true, one);
  EXPECT_EQ(r.stale_holder(), "pid 999999 on elsewhere");
  fs::remove_all(dir);
}

// The BF16 and FP8 copies of the weights are made once per optimizer step, however many micro-batches use them.
// logging.profile_steps: the recorded step's Chrome trace in the run directory, with the named ranges.
TEST(Trainer, ProfilerWritesAChromeTraceWithNamedRanges) {
  const fs::path dir = temp_dir("profile");
  config::Config c = tiny({"train.steps=2", "train.eval_interval=0", "logging.profile_steps=1",
                           "logging.profile_start_step=2", "logging.dir=" + dir.string(), "logging.name=run"});
  {
    Trainer t(c, nullptr, (dir / "run").string(), true);
    t.run();
  }
  const fs::path trace = dir / "run" / "profile" / "rank0.json";
  ASSERT_TRUE(fs::exists(trace));
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(trace));
  std::map<std::string, int> ranges;
  for (const auto& e : j.at("traceEvents"))
    if (e.value("cat", "") == "user_annotation") ++ranges[e.at("name").get<std::string>()];
  const int micro_batches = static_cast<int>(c.train.micro_batches);  // of the one recorded step
  EXPECT_EQ(ranges["forward"], micro_batches);
  EXPECT_EQ(ranges["backward"], micro_batches);
  EXPECT_EQ(ranges["optimizer"], 1);
  fs::remove_all(dir);
}

// bf16: the parameters are BF16 and the GEMMs read them (no copy); fp8: E4M3 copies once per optimizer step,
// however many micro-batches use them.
TEST(Trainer, LowPrecisionWeightCopiesOncePerStep) {
  for (const std::string mode : {"bf16", "fp8"}) {
    std::vector<int64_t> copies;
    for (const std::string micro : {"16", "4"}) {  // 1 and 4 micro-batches of the 16 sequences
      Trainer t(tiny({"precision.mode=" + mode, "train.micro_batch_size=" + micro, "model.moe_inter_dim=128",
                      "model.dense_inter_dim=128", "model.hidden_size=128", "model.num_layers=2", "model.mtp_depth=0",
                      "train.seq_len=16"}),
                nullptr, "", false);
      t.step();
      const int64_t before = precision::weight_copies_made();
      t.step();
      copies.push_back(precision::weight_copies_made() - before);
    }
    if (mode == "bf16") {
      EXPECT_EQ(copies[0], 0);
    } else {
      EXPECT_GT(copies[0], 0) << mode;
    }
    EXPECT_EQ(copies[0], copies[1]) << mode;
  }
}

// bf16 / fp8: the model holds BF16 parameters, the optimizer their FP32 master weights, the gradients are FP32;
// after every step each parameter is its master weights rounded to BF16.
TEST(Trainer, Bf16ParametersFp32MasterWeightsAndGradients) {
  for (const std::string mode : {"bf16", "fp8"}) {
    Trainer t(tiny({"precision.mode=" + mode, "train.micro_batch_size=4", "model.moe_inter_dim=128",
                    "model.dense_inter_dim=128", "model.hidden_size=128", "model.num_layers=2", "train.seq_len=16"}),
              nullptr, "", false);
    for (int i = 0; i < 2; ++i) t.step();
    const AdamW& opt = t.optimizer();
    ASSERT_TRUE(opt.has_master()) << mode;
    int64_t numel = 0;
    for (size_t i = 0; i < opt.pieces().size(); ++i) {
      const NamedParam& p = opt.params()[opt.pieces()[i].param];
      EXPECT_EQ(p.param.scalar_type(), at::kBFloat16) << p.name;
      ASSERT_TRUE(p.param.grad().defined()) << p.name;
      EXPECT_EQ(p.param.grad().scalar_type(), at::kFloat) << p.name;
      EXPECT_EQ(opt.master(i).scalar_type(), at::kFloat) << p.name;
      EXPECT_TRUE(at::equal(p.param, opt.master(i).to(at::kBFloat16))) << p.name;
      numel += p.param.numel();
    }
    EXPECT_EQ(opt.master_bytes(), 4 * numel);
  }
  Trainer fp32(tiny(), nullptr, "", false);
  EXPECT_FALSE(fp32.optimizer().has_master());
  EXPECT_EQ(fp32.optimizer().master_bytes(), 0);
}

// What the FP32 gradient accumulation of BF16 parameters rests on: a BF16 leaf whose .grad is an FP32 tensor
// accumulates each backward pass's (BF16) gradient into it in place, in FP32.
TEST(Trainer, Bf16ParameterGradientsAccumulateInFp32) {
  at::Tensor p = torch::ones({4}, torch::dtype(at::kBFloat16).requires_grad(true));
  at::Tensor grad = torch::ones({4}, at::kFloat);
  p.mutable_grad() = grad;
  for (int i = 0; i < 4; ++i) (p * 1e-3).sum().backward();
  EXPECT_TRUE(p.grad().is_same(grad));  // the same FP32 tensor, added to in place
  const float expected = 1.0f + 4 * static_cast<float>(c10::BFloat16(1e-3f));
  EXPECT_FLOAT_EQ(grad[0].item<float>(), expected);  // BF16 accumulation would have stayed at 1
}

// With FP32 moments the CPU update is LibTorch's fused AdamW kernel (one pass per parameter, clipping folded in),
// and it computes what the per-tensor operations compute: weight decay on matrices only, a missing gradient as
// zero, the clip factor applied to every gradient.
TEST(AdamW, FusedKernelMatchesThePerTensorOperations) {
  config::TrainConfig t;
  t.weight_decay = 0.1;
  auto make = [&] {
    torch::manual_seed(3);
    return std::vector<NamedParam>{{"w", torch::randn({8, 16}).requires_grad_(true)},
                                   {"norm", torch::randn({16}).requires_grad_(true)},
                                   {"starved", torch::randn({4, 4}).requires_grad_(true)}};
  };
  auto fused_params = make(), plain_params = make();
  AdamW fused(fused_params, t, at::kFloat), plain(plain_params, t, at::kFloat);
  plain.use_fused(false);
  EXPECT_TRUE(fused.fused_kernel());
  EXPECT_FALSE(plain.fused_kernel());
  EXPECT_FALSE(AdamW(make(), t, at::kBFloat16).fused_kernel());  // BF16 moments: the per-tensor operations
  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(10 + step);
    const at::Tensor gw = torch::randn({8, 16}), gn = torch::randn({16});
    for (auto* ps : {&fused_params, &plain_params}) {
      (*ps)[0].param.mutable_grad() = gw.clone();
      (*ps)[1].param.mutable_grad() = gn.clone();
      (*ps)[2].param.mutable_grad() = at::Tensor();
    }
    const double clip = step % 2 ? 0.5 : 1.0;
    fused.step(1e-2, clip);
    plain.step(1e-2, clip);
    for (size_t i = 0; i < fused_params.size(); ++i) {
      EXPECT_LE((fused_params[i].param - plain_params[i].param).abs().max().item<double>(), 1e-6)
          << fused_params[i].name << " step " << step;
      EXPECT_LE((fused.exp_avg_sq(i) - plain.exp_avg_sq(i)).abs().max().item<double>(), 1e-6);
    }
  }
  // The starved matrix (no gradient on any step) still moved: weight decay and its decaying moments.
  const auto start = make();
  EXPECT_GT((fused_params[2].param - start[2].param).abs().max().item<double>(), 0.0);
}


// The batch-size ramp in the trainer: steps of 4, 4, 4, 8, 12, then 16 sequences (the ramp's 30 sequences over 3
// increments of 4). The first step is the step of a run with that batch; more, smaller micro-batches compute the same
// steps; a run resumed inside the ramp continues bit for bit, and its checkpoint counts the sequences trained.
TEST(Trainer, BatchSizeRampGrowsTheBatchAndResumesExactly) {
  const fs::path dir = temp_dir("ramp");
  const std::vector<std::string> ramp{"train.steps=8", "train.eval_interval=0", "train.global_batch_size=16",
                                      "train.batch_rampup_start=4", "train.batch_rampup_increment=4",
                                      "train.batch_rampup_tokens=1920", "checkpoint.dir=ck", "checkpoint.interval=4"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), ramp.begin(), ramp.end());
    return tiny(extra);
  };
  Trainer whole(with({"train.micro_batch_size=2"}), nullptr, (dir / "whole").string(), true);
  const std::vector<int64_t> batches{4, 4, 4, 8, 12, 16, 16, 16};
  std::vector<double> losses;
  for (int64_t step = 0; step < 8; ++step) {
    EXPECT_EQ(whole.batch_shape().global_sequences(step), batches[step]) << "step " << step;
    EXPECT_EQ(whole.batch_shape().micro_batches_at(step), batches[step] / 2);
    losses.push_back(whole.step().loss);
    if (step == 3) whole.save_checkpoint();
  }
  whole.settle_checkpoints();

  Trainer small(tiny({"train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=2"}), nullptr, "", false);
  EXPECT_EQ(small.step().loss, losses[0]) << "the ramp's first step is a step of its batch";
  Trainer fewer(with({"train.micro_batch_size=4"}), nullptr, "", false);
  for (int64_t step = 0; step < 8; ++step)
    EXPECT_NEAR(fewer.step().loss, losses[step], 1e-5 * losses[step]) << "micro-batches of 4, step " << step;

  const fs::path saved = dir / "whole" / "ck" / "step_0000004";
  ASSERT_TRUE(fs::exists(saved));
  Trainer resumed(with({"train.micro_batch_size=2"}), nullptr, (dir / "resumed").string(), true, saved.string());
  EXPECT_EQ(resumed.steps_done(), 4);
  for (int64_t step = 4; step < 8; ++step) EXPECT_EQ(resumed.step().loss, losses[step]) << "resumed step " << step;
  resumed.save_checkpoint();
  resumed.settle_checkpoints();
  const auto index = nlohmann::json::parse(std::ifstream(dir / "resumed" / "ck" / "step_0000008" / "index.json"));
  EXPECT_EQ(index["meta"]["trainer"]["samples_consumed"], 4 + 4 + 4 + 8 + 12 + 16 + 16 + 16);
  EXPECT_EQ(index["meta"]["trainer"]["tokens_seen"], 80 * 64);
  fs::remove_all(dir);
}


// CRC-32C's check value; an event file resumed after step 3 is, byte for byte in length, the file of a run that
// stopped there (the records of steps 4 and 5 cut, and a torn record at the end too); a fresh one starts over.
TEST(EventFile, ResumeCutsTheStepsAfterItAndATornTail) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  const fs::path dir = temp_dir("events");
  auto write = [](const fs::path& p, int64_t resumed, int64_t from, int64_t to) {
    EventFile f(p.string(), resumed);
    for (int64_t s = from; s <= to; ++s) {
      f.scalar("train/loss", s, 1.0 / static_cast<double>(s));
      f.histogram("moe/tokens_per_expert/layers.1", s, {1, 2, 3, 4, 10});
    }
    f.flush();
  };
  write(dir / "three", -1, 1, 3);
  write(dir / "five", -1, 1, 5);
  const auto three = fs::file_size(dir / "three");
  EXPECT_GT(fs::file_size(dir / "five"), three);
  write(dir / "five", 3, 4, 3);  // resumed after step 3, nothing new yet
  EXPECT_EQ(fs::file_size(dir / "five"), three);
  std::ofstream(dir / "five", std::ios::app) << "torn";
  write(dir / "five", 3, 4, 4);
  write(dir / "three", 3, 4, 4);
  EXPECT_EQ(fs::file_size(dir / "five"), fs::file_size(dir / "three"));
  write(dir / "five", -1, 1, 3);
  EXPECT_EQ(fs::file_size(dir / "five"), three);
  fs::remove_all(dir);
}

// metrics.jsonl of a run resumed after step 2 keeps the records up to it, drops later ones and a torn last line.
TEST(MetricsWriter, ResumeKeepsTheRecordsUpToTheResumedStep) {
  const fs::path dir = temp_dir("metrics");
  const std::string path = (dir / "metrics.jsonl").string();
  std::ofstream(path) << "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2}\n{\"step\":2,\"val_loss\":2.5}\n"
                         "{\"step\":3,\"loss\":1}\n{\"step\":4,\"lo";
  {
    MetricsWriter w(path, 2);
    w.write({{"step", 3}, {"loss", 1.5}});
  }
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2}\n{\"step\":2,\"val_loss\":2.5}\n"
                  "{\"loss\":1.5,\"step\":3}\n");
  fs::remove_all(dir);
}


// The end-of-run summary: the steps this process trained, tokens and tokens/s over the steps' own time, MFU weighted
// by it, the last validation loss and its gap, the checkpoints, the peak memory of any rank.
TEST(RunSummary, SaysWhatTheRunDid) {
  RunSummary s(3);
  StepResult a, b;
  a.step = 3, a.tokens_per_s = 1000, a.step_time_s = 2, a.mfu = 0.2, a.peak_memory_bytes = {1048576, 3145728};
  b.step = 4, b.tokens_per_s = 3000, b.step_time_s = 1, b.mfu = 0.5, b.peak_memory_bytes = {2097152, 1048576};
  EXPECT_EQ(&s.add(a), &a);
  s.add(b);
  EvalResult e;
  e.loss = 1.25;
  s.add(5, e);
  s.saved(5);
  EXPECT_EQ(s.line(4.0, 1.0, "ck"), "summary: 2 steps (3 → 5), 5000 tokens in 4s | 1667 tokens/s, MFU 30.0% | val loss "
                                    "1.2500 at step 5 (gap 0.2500 to the entropy rate) | 1 checkpoint(s), the last of "
                                    "step 5 in ck | peak mem 3.0 MiB\n");
  EXPECT_EQ(RunSummary(0).line(0, -1, "ck"), "summary: 0 steps (0 → 0), 0 tokens in 0s | 0 tokens/s, MFU 0.0% | no "
                                             "checkpoint | peak mem 0.0 MiB\n");
}


// The MTP loss of each depth: two depths, their mean the step's mtp_loss, each in metrics.jsonl's mtp_losses.
TEST(Trainer, ReportsTheMtpLossOfEachDepth) {
  Trainer t(tiny({"model.mtp_depth=2", "train.steps=1"}), nullptr, "", false);
  const StepResult r = t.step();
  ASSERT_EQ(r.mtp_losses.size(), 2u);
  EXPECT_NE(r.mtp_losses[0], r.mtp_losses[1]);
  EXPECT_NEAR((r.mtp_losses[0] + r.mtp_losses[1]) / 2, r.mtp_loss, 1e-12 * r.mtp_loss);
  EXPECT_EQ(step_record(r)["mtp_losses"], nlohmann::json(r.mtp_losses));
}

}  // namespace
}  // namespace moetrain::trainer
