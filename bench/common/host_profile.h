// Wall-clock sampling of the main thread's call stack, for finding where a host-bound GPU step spends
// its time on machines without perf. A POSIX timer aimed at the calling thread raises SIGPROF every
// period; the handler stores the raw return addresses. write() saves them with /proc/self/maps, and
// tools/host_profile.py symbolises them against the unstripped binary (the GPU machine may run a
// stripped copy). Samples taken inside a blocking CUDA call show where the host waited for the GPU.
#pragma once
#include <execinfo.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace dsv3::bench {

class HostProfiler {
 public:
  static constexpr int kDepth = 64;
  static constexpr int kSkip = 2;  // the handler and the kernel's signal trampoline

  // Samples beyond max_samples are dropped (and counted).
  explicit HostProfiler(size_t max_samples = 100000) : buf_(max_samples * kDepth), depth_(max_samples) {}
  ~HostProfiler() { stop(); }

  void start(int period_us) {
    void* prime[4];
    backtrace(prime, 4);  // loads the unwinder outside the signal handler
    self() = this;
    struct sigaction sa {};
    sa.sa_sigaction = &HostProfiler::on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPROF, &sa, nullptr);
    sigevent ev{};
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGPROF;
    ev._sigev_un._tid = pid_t(syscall(SYS_gettid));
    if (timer_create(CLOCK_MONOTONIC, &ev, &timer_) != 0) {
      std::perror("host profile: timer_create");
      return;
    }
    itimerspec it{};
    it.it_interval.tv_nsec = long(period_us) * 1000;
    it.it_value = it.it_interval;
    timer_settime(timer_, 0, &it, nullptr);
    running_ = true;
  }

  void stop() {
    if (!running_) return;
    itimerspec off{};
    timer_settime(timer_, 0, &off, nullptr);
    timer_delete(timer_);
    signal(SIGPROF, SIG_IGN);
    running_ = false;
  }

  // One line per sample ("s" and its return addresses, innermost first), after the maps.
  bool write(const std::string& path) const {
    std::ofstream out(path);
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) out << "m " << line << '\n';
    const size_t n = std::min(count_.load(), depth_.size());
    out << "dropped " << (count_.load() - n) << '\n';
    char hex[24];
    for (size_t i = 0; i < n; ++i) {
      out << 's';
      for (int j = kSkip; j < depth_[i]; ++j) {
        std::snprintf(hex, sizeof hex, " %lx", reinterpret_cast<unsigned long>(buf_[i * kDepth + size_t(j)]));
        out << hex;
      }
      out << '\n';
    }
    return bool(out);
  }

  size_t samples() const { return std::min(count_.load(), depth_.size()); }

 private:
  static HostProfiler*& self() {
    static HostProfiler* p = nullptr;
    return p;
  }
  static void on_signal(int, siginfo_t*, void*) {
    HostProfiler* p = self();
    const size_t i = p->count_.fetch_add(1);
    if (i >= p->depth_.size()) return;
    p->depth_[i] = backtrace(&p->buf_[i * kDepth], kDepth);
  }

  std::vector<void*> buf_;
  std::vector<int> depth_;
  std::atomic<size_t> count_{0};
  timer_t timer_{};
  bool running_ = false;
};

}  // namespace dsv3::bench
