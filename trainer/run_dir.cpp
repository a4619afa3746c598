#include "trainer/run_dir.h"

#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <stdexcept>
#include <thread>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "config/loader.h"

namespace moetrain::trainer {
namespace {

std::string holder_of(int fd) {
  char buf[256] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  std::string s(buf, n > 0 ? static_cast<size_t>(n) : 0);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string in_use(const std::string& dir, const std::string& holder) {
  return fmt::format("{}: the run directory is in use by another job ({}); wait for it to end or choose another "
                     "logging.name",
                     dir, holder.empty() ? "holder unknown" : holder);
}

}  // namespace

void RunDirectory::refuse_if_in_use(const std::string& dir) {
  const std::string path = dir + "/.lock";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // no lock file: never used, or not readable (the real lock attempt will say so)
  const bool busy = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  const std::string holder = busy ? holder_of(fd) : "";
  ::close(fd);  // releases the shared lock this look may have taken
  if (busy) throw std::runtime_error(in_use(dir, holder));
}

RunDirectory::RunDirectory(std::string dir, bool main, parallel::ControlPlane& control)
    : dir_(std::move(dir)), main_(main) {
  if (dir_.empty()) return;
  std::string error;
  if (main_) {
    try {
      std::filesystem::create_directories(dir_);
      const std::string path = dir_ + "/.lock";
      fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd_ < 0) throw std::runtime_error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
      const std::string before = holder_of(fd_);
      // A few tries over a second: refuse_if_in_use() of a starting job's ranks holds the lock shared for an
      // instant; a running job holds it for its lifetime.
      int rc = -1;
      for (int tries = 0; tries < 100 && (rc = ::flock(fd_, LOCK_EX | LOCK_NB)) != 0 && errno == EWOULDBLOCK; ++tries)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (rc != 0) {
        const int err = errno;
        throw std::runtime_error(
            err == EWOULDBLOCK ? in_use(dir_, before)
                               : fmt::format("{}: cannot lock: {}", path, std::strerror(err)));
      }
      stale_ = before;  // a holder that still ran would have kept the lock
      char host[256] = {};
      ::gethostname(host, sizeof(host) - 1);
      const std::string me = fmt::format("pid {} on {}\n", ::getpid(), host);
      if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size()))
        throw std::runtime_error(fmt::format("{}: cannot write: {}", path, std::strerror(errno)));
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (control.any(!error.empty()))
    throw std::runtime_error(error.empty() ? "rank 0 could not take the run directory's lock" : error);
}

RunDirectory::~RunDirectory() {
  if (fd_ < 0) return;
  // Emptied on a clean end: a holder left in the file means its process ended without releasing it.
  if (::ftruncate(fd_, 0) != 0) {
  }
  ::flock(fd_, LOCK_UN);
  ::close(fd_);
}

void RunDirectory::start(const config::Config& c, int64_t resumed_step) {
  if (dir_.empty() || !main_) return;
  expert_loads_interval_ = c.logging.expert_loads_interval;
  config::write_resolved(c, dir_ + "/config.yaml");
  metrics_ = std::make_unique<MetricsWriter>(dir_ + "/metrics.jsonl", resumed_step);
  if (c.logging.tensorboard) events_ = std::make_unique<EventFile>(dir_ + "/events.out.tfevents.moetrain", resumed_step);
  if (!stale_.empty()) {
    fmt::print("{}: took over the lock left by {}, which ended without releasing it\n", dir_, stale_);
    std::fflush(stdout);
  }
}

void RunDirectory::record(const StepResult& r) {
  const int64_t step = r.step + 1;  // as in metrics.jsonl: the steps done
  if (metrics_) metrics_->write(step_record(r, expert_loads_interval_ > 0 && step % expert_loads_interval_ == 0));
  if (!events_) return;
  for (const auto& [tag, v] : std::initializer_list<std::pair<const char*, double>>{
           {"train/loss", r.loss},
           {"train/lm_loss", r.lm_loss},
           {"train/mtp_loss", r.mtp_loss},
           {"train/balance_loss", r.balance_loss},
           {"train/grad_norm", r.grad_norm},
           {"train/lr", r.lr},
           {"perf/tokens_per_s", r.tokens_per_s},
           {"perf/step_time_s", r.step_time_s},
           {"perf/mfu", r.mfu},
           {"perf/comm_wait_s", r.comm_wait_s}})
    events_->scalar(tag, step, v);
  for (size_t k = 0; k < r.mtp_losses.size(); ++k)
    events_->scalar("train/mtp_loss_depth" + std::to_string(k + 1), step, r.mtp_losses[k]);
  for (const auto& l : r.moe) {
    events_->scalar("moe/max_vio/" + l.layer, step, l.max_vio);
    events_->scalar("moe/bias_min/" + l.layer, step, l.bias_min);
    events_->scalar("moe/bias_max/" + l.layer, step, l.bias_max);
    events_->histogram("moe/tokens_per_expert/" + l.layer, step, std::vector<double>(l.tokens.begin(), l.tokens.end()));
  }
  events_->flush();
}

void RunDirectory::record(int64_t steps_done, const EvalResult& e) {
  if (metrics_) metrics_->write(eval_record(steps_done, e));
  if (!events_) return;
  events_->scalar("val/loss", steps_done, e.loss);
  events_->scalar("val/max_vio", steps_done, e.max_vio);
  events_->flush();
}

}  // namespace moetrain::trainer
