#include "train/metrics.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// Run `prog arg` without a shell (paths may hold any character), stderr discarded; its exit status.
int run_quietly(const std::string& prog, const std::string& arg) {
  pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    if (devnull >= 0) ::dup2(devnull, 2);
    const char* argv[] = {prog.c_str(), arg.c_str(), nullptr};
    ::execv(prog.c_str(), const_cast<char* const*>(argv));
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

std::string si_count(double v) {
  const char* suffix[] = {"", "k", "M", "G", "T"};
  int i = 0;
  while (std::abs(v) >= 999.5 && i < 4) v /= 1000.0, ++i;
  std::string num = std::abs(v) >= 99.5 ? fmt("%.0f", v) : std::abs(v) >= 9.95 ? fmt("%.1f", v) : fmt("%.2f", v);
  if (i == 0 && v == std::floor(v)) num = fmt("%.0f", v);
  return cat(num, suffix[i]);
}

std::string format_duration(double s) {
  if (!(s >= 0) || !std::isfinite(s)) return "?";
  long t = long(std::llround(s));
  char buf[32];
  if (t < 60)
    std::snprintf(buf, sizeof buf, "%lds", t);
  else if (t < 3600)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  return buf;
}

std::string format_step_line(const StepLine& s) {
  int w = int(std::to_string(s.total).size());
  char head[64];
  std::snprintf(head, sizeof head, "step %*lld/%lld", w, static_cast<long long>(s.step),
                static_cast<long long>(s.total));
  std::string out = head;
  out += cat(" | loss ", fmt("%.4f", s.loss), " | norm ", fmt("%.4f", s.grad_norm), " | lr ",
             fmt("%.2e", s.lr), " | ", fmt("%.0f", s.ms), " ms");
  if (s.tok_per_s > 0) out += cat(" | ", si_count(s.tok_per_s), " tok/s");
  if (s.skipped) out += " | SKIPPED (non-finite)";
  return out;
}

double ThroughputMeter::add(int64_t tokens, double seconds) {
  if (steps_++ == 0 || seconds <= 0) return 0.0;
  ++counted_;
  ema_ = 0.95 * ema_ + 0.05 * (double(tokens) / seconds);
  return ema_ / (1.0 - std::pow(0.95, double(counted_)));
}

std::string render_progress(int64_t done, int64_t total, double elapsed_s, int width) {
  double frac = total > 0 ? std::min(1.0, double(done) / double(total)) : 0.0;
  int fill = int(frac * width + 1e-9);
  std::string bar = cat("[", std::string(size_t(fill), '#'), std::string(size_t(width - fill), '-'), "]");
  char buf[96];
  std::snprintf(buf, sizeof buf, " %3d%%  %lld/%lld", int(frac * 100 + 1e-9),
                static_cast<long long>(done), static_cast<long long>(total));
  std::string eta = done > 0 && done < total
                        ? cat("  eta ", format_duration(elapsed_s / double(done) * double(total - done)))
                        : done >= total ? cat("  ", format_duration(elapsed_s)) : std::string();
  return cat(bar, buf, eta);
}

ProgressBar::ProgressBar(int64_t total) : total_(total), enabled_(::isatty(2) != 0), t0_(now_s()) {}

void ProgressBar::update(int64_t done) {
  if (!enabled_) return;
  std::fprintf(stderr, "\r%s\033[K", render_progress(done, total_, now_s() - t0_).c_str());
  std::fflush(stderr);
}

void ProgressBar::clear() {
  if (!enabled_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
}

MetricsLog::MetricsLog(std::string path, int64_t resume_step) : path_(std::move(path)) {
  std::string kept;
  if (resume_step >= 0) {
    std::ifstream in(path_);
    std::string line;
    int lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.empty()) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
        if (j.at("step").get<int64_t>() > resume_step) continue;
      } catch (const nlohmann::json::exception& e) {
        // A line cut by a crash can only be the last one; anything else is damage.
        if (in.peek() == EOF) break;
        input_error(path_, ":", lineno, ": not a metrics record: ", e.what());
      }
      kept += line + "\n";
    }
  }
  write_file_atomic(path_, kept);
}

void MetricsLog::append(const nlohmann::json& record) {
  DSV3_CHECK(record.is_object() && record.contains("step") && record.contains("loss"),
             "a metrics record needs step and loss: ", record.dump());
  std::ofstream out(path_, std::ios::app | std::ios::binary);
  out << record.dump() << "\n";
  out.flush();
  if (!out) internal_error(path_, ": cannot append a metrics record");
}

std::string find_program(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (!path) return "";
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string p = dir + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

void plot_loss_curve(const std::string& metrics_path, const std::string& png_path,
                     const std::string& title) {
  const std::string gnuplot = find_program("gnuplot");
  if (gnuplot.empty())
    input_error("cannot draw ", png_path, ": gnuplot is not installed (Debian package gnuplot-nox; "
                "scripts/setup.sh installs it)");
  std::ifstream in(metrics_path);
  if (!in) input_error(metrics_path, ": cannot open the metrics to plot");
  std::string train, val, line;
  size_t n_train = 0, n_val = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step")) continue;
    auto num = [&](const char* k) { return j.contains(k) && j[k].is_number(); };
    if (num("loss") && std::isfinite(j["loss"].get<double>()))
      train += cat(j["step"].get<int64_t>(), " ", j["loss"].get<double>(), "\n"), ++n_train;
    if (num("val_loss"))
      val += cat(j["step"].get<int64_t>(), " ", j["val_loss"].get<double>(), "\n"), ++n_val;
  }
  if (n_train == 0) input_error(metrics_path, ": no finite training loss to plot");
  const std::string dir = fs::path(png_path).parent_path().string();
  const std::string base = cat(dir.empty() ? "." : dir, "/.plot.", ::getpid());
  const std::string tdat = base + ".train.dat", vdat = base + ".val.dat", gp = base + ".gp";
  const std::string tmp_png = base + ".png";
  auto cleanup = [&] {
    for (const auto& f : {tdat, vdat, gp, tmp_png}) std::remove(f.c_str());
  };
  std::ofstream(tdat) << train;
  std::ofstream(vdat) << val;
  std::string t = title;
  for (char& c : t)
    if (c == '"' || c == '\\') c = '\'';
  std::string script = cat("set terminal png size 900,540\nset output '", tmp_png, "'\n",
                           "set title \"", t, "\"\nset xlabel 'step'\nset ylabel 'loss'\n",
                           "set grid\nset key top right\n", "plot '", tdat,
                           "' using 1:2 with lines lw 1 lc rgb '#1f77b4' title 'train loss'");
  if (n_val)
    script += cat(", '", vdat, "' using 1:2 with linespoints pt 7 ps 0.6 lw 2 lc rgb '#d62728' title 'val loss'");
  script += "\n";
  std::ofstream(gp) << script;
  int rc = run_quietly(gnuplot, gp);
  if (rc != 0 || !fs::exists(tmp_png)) {
    cleanup();
    internal_error("gnuplot failed (exit status ", rc, ") drawing ", png_path);
  }
  if (std::rename(tmp_png.c_str(), png_path.c_str()) != 0) {
    cleanup();
    internal_error(png_path, ": cannot move the plot into place");
  }
  cleanup();
}

}  // namespace dsv3
