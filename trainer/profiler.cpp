#include "trainer/profiler.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <filesystem>
#include <set>
#include <stdexcept>

namespace moetrain::trainer {
namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;

prof::ProfilerConfig kineto_config() {
  return prof::ProfilerConfig(torch::profiler::impl::ProfilerState::KINETO, /*report_input_shapes=*/true);
}

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}

}  // namespace

StepProfiler::StepProfiler(const config::LoggingConfig& logging, std::string dir, int rank, bool cuda)
    : cuda_(cuda) {
  if (dir.empty() || logging.profile_steps <= 0) return;
  first_ = logging.profile_start_step;
  last_ = first_ + logging.profile_steps - 1;
  path_ = (std::filesystem::path(dir) / "profile" / fmt::format("rank{}.json", rank)).string();
}

StepProfiler::~StepProfiler() {
  if (on_) prof::disableProfiler();  // an error mid-way: stop recording, write nothing
}

void StepProfiler::before(int64_t step) {
  if (step != first_ || last_ < first_ || on_) return;
  prof::prepareProfiler(kineto_config(), activities(cuda_));
  prof::enableProfiler(kineto_config(), activities(cuda_));
  on_ = true;
}

std::string StepProfiler::after(int64_t step) {
  if (!on_ || step != last_) return "";
  on_ = false;
  const auto result = prof::disableProfiler();
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path_).parent_path(), ec);
  if (ec)
    throw std::runtime_error(fmt::format("logging.profile_steps: cannot create {}: {}",
                                         std::filesystem::path(path_).parent_path().string(), ec.message()));
  result->save(path_);
  if (!std::filesystem::exists(path_))
    throw std::runtime_error(fmt::format("logging.profile_steps: the trace {} was not written", path_));
  return path_;
}

}  // namespace moetrain::trainer
