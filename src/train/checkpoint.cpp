#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/checkpoint_index.h"
#include "io/checksum.h"
#include "train/optimizer.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

constexpr const char* kManifestFormat = "dsv3-checkpoint";
constexpr const char* kStateFormat = "dsv3-trainer-state";

// step-N with N all digits; -1 otherwise.
int64_t parse_step_name(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() < 6 || name.size() > 5 + 18) return -1;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

void remove_tree(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  if (ec) internal_error(p.string(), ": cannot remove: ", ec.message());
}

}  // namespace

std::string checkpoint_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) internal_error(dir, ": cannot open directory to fsync: ", std::strerror(errno));
  int rc = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (rc != 0) internal_error(dir, ": fsync of directory failed: ", std::strerror(e));
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  write_file_atomic(path, j.dump(2) + "\n");
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error(path, ": cannot open: ", std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    input_error(path, ": not valid JSON: ", e.what());
  }
}

void copy_file_atomic(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) input_error(from, ": cannot open for copying: ", std::strerror(errno));
  AtomicFile out(to);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    if (in.gcount() > 0) out.write(buf.data(), size_t(in.gcount()));
  }
  if (in.bad()) input_error(from, ": read error while copying");
  out.commit();
}

nlohmann::json verify_checkpoint(const std::string& dir, bool full) {
  const std::string mpath = dir + "/" + kManifestFileName;
  struct stat st {};
  if (::stat(mpath.c_str(), &st) != 0)
    input_error(dir, ": no ", kManifestFileName, " (the save did not finish)");
  nlohmann::json m = read_json_file(mpath);
  std::set<std::string> listed = {kManifestFileName};
  try {
    if (m.at("format").get<std::string>() != kManifestFormat)
      input_error(mpath, ": format is not \"", kManifestFormat, "\"");
    if (m.at("version").get<int>() != 1) input_error(mpath, ": version ", m.at("version"), " is not 1");
    int64_t want = parse_step_name(fs::path(dir).filename().string());
    if (want >= 0 && m.at("step").get<int64_t>() != want)
      input_error(mpath, ": step ", m.at("step"), " does not match the directory name");
    for (const auto& e : m.at("files")) {
      std::string name = e.at("file").get<std::string>();
      if (name.empty() || name.find('/') != std::string::npos || name[0] == '.')
        input_error(mpath, ": file name '", name, "' is not a plain file name");
      if (!listed.insert(name).second) input_error(mpath, ": file ", name, " listed twice");
      const std::string p = dir + "/" + name;
      uint64_t bytes = e.at("bytes").get<uint64_t>();
      if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
        input_error(dir, ": file ", name, " listed in the manifest is missing");
      if (uint64_t(st.st_size) != bytes)
        input_error(dir, ": file ", name, " has ", st.st_size, " bytes, the manifest says ", bytes);
      if (full) {
        FileDigest d = digest_file(p);
        std::string want_crc = e.at("crc32").get<std::string>();
        if (crc_hex(d.crc) != want_crc || d.size != bytes)
          input_error(dir, ": file ", name, " has CRC-32 ", crc_hex(d.crc), ", the manifest says ",
                      want_crc, " (the file is corrupt)");
      }
    }
  } catch (const nlohmann::json::exception& e) {
    input_error(mpath, ": ", e.what());
  }
  for (const auto& ent : fs::directory_iterator(dir)) {
    std::string name = ent.path().filename().string();
    if (!listed.count(name))
      input_error(dir, ": file ", name, " is not in the manifest (an unfinished or altered checkpoint)");
  }
  return m;
}

CheckpointManager::CheckpointManager(std::string root, int keep) : root_(std::move(root)), keep_(keep) {
  if (keep < 1) input_error("checkpoints to keep: ", keep, " must be ≥ 1");
  std::error_code ec;
  if (!fs::is_directory(root_, ec)) {
    fs::path parent = fs::path(root_).parent_path();
    if (!parent.empty() && !fs::is_directory(parent, ec))
      input_error(root_, ": cannot create the run directory: its parent '", parent.string(),
                  "' does not exist");
    if (!fs::create_directory(root_, ec) && !fs::is_directory(root_))
      input_error(root_, ": cannot create the run directory: ", ec.message());
  }
}

std::vector<int64_t> CheckpointManager::steps_present() const {
  std::vector<int64_t> out;
  for (const auto& ent : fs::directory_iterator(root_)) {
    int64_t s = parse_step_name(ent.path().filename().string());
    if (s >= 0 && ent.is_directory()) out.push_back(s);
  }
  std::sort(out.begin(), out.end());
  return out;
}

CheckpointScan CheckpointManager::scan(bool full) const {
  CheckpointScan r;
  std::vector<int64_t> steps = steps_present();
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const std::string dir = root_ + "/" + checkpoint_dir_name(*it);
    try {
      verify_checkpoint(dir, full);
      r.newest = FoundCheckpoint{dir, *it};
      break;
    } catch (const InputError& e) {
      r.rejected.push_back(cat(checkpoint_dir_name(*it), ": ", e.what()));
    }
  }
  return r;
}

CheckpointScan CheckpointManager::resume(bool full) {
  CheckpointScan r = scan(full);
  if (r.newest) point_latest(checkpoint_dir_name(r.newest->step));
  return r;
}

void CheckpointManager::point_latest(const std::string& name) {
  const std::string link = root_ + "/" + kLatestLinkName;
  char cur[256];
  ssize_t n = ::readlink(link.c_str(), cur, sizeof cur - 1);
  if (n > 0 && std::string(cur, size_t(n)) == name) return;
  const std::string tmp = cat(root_, "/.", kLatestLinkName, ".tmp.", ::getpid());
  ::unlink(tmp.c_str());
  if (::symlink(name.c_str(), tmp.c_str()) != 0)
    internal_error(tmp, ": cannot create symlink: ", std::strerror(errno));
  if (::rename(tmp.c_str(), link.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    internal_error(link, ": cannot replace: ", std::strerror(e),
                   " (a directory named 'latest' in the run directory?)");
  }
  fsync_dir(root_);
}

void CheckpointManager::remove_leftovers() {
  for (const auto& ent : fs::directory_iterator(root_)) {
    std::string name = ent.path().filename().string();
    if (name.rfind("step-", 0) == 0 && ends_with(name, ".tmp")) remove_tree(ent.path());
    if (name.rfind(std::string(".") + kLatestLinkName + ".tmp.", 0) == 0) fs::remove(ent.path());
  }
}

void CheckpointManager::rotate() {
  std::vector<int64_t> steps = steps_present();
  // Keep the newest `keep` directories that verify by size; older ones go.
  int kept = 0;
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const std::string name = checkpoint_dir_name(*it);
    bool complete = true;
    try {
      verify_checkpoint(root_ + "/" + name, /*full=*/false);
    } catch (const InputError&) {
      complete = false;
    }
    if (complete && kept < keep_) {
      ++kept;
      continue;
    }
    // Renamed first, so a crash mid-removal never leaves a half-deleted step-N.
    const std::string doomed = root_ + "/" + name + ".del.tmp";
    remove_tree(doomed);
    if (::rename((root_ + "/" + name).c_str(), doomed.c_str()) != 0)
      internal_error(root_, "/", name, ": cannot rename for removal: ", std::strerror(errno));
    fsync_dir(root_);
    remove_tree(doomed);
  }
}

std::string CheckpointManager::save(int64_t step,
                                    const std::function<void(const std::string& dir)>& write) {
  DSV3_CHECK(step >= 0, "negative checkpoint step");
  remove_leftovers();
  const std::string name = checkpoint_dir_name(step);
  const std::string tmp = root_ + "/" + name + ".tmp";
  const std::string final_dir = root_ + "/" + name;
  std::error_code ec;
  if (!fs::create_directory(tmp, ec))
    internal_error(tmp, ": cannot create checkpoint directory: ", ec ? ec.message() : "exists");
  try {
    write(tmp);
    nlohmann::json files = nlohmann::json::array();
    std::vector<std::string> names;
    for (const auto& ent : fs::directory_iterator(tmp)) {
      std::string f = ent.path().filename().string();
      if (f == kManifestFileName) internal_error(tmp, ": a writer produced ", kManifestFileName);
      if (f[0] == '.' || !ent.is_regular_file())
        internal_error(tmp, ": unexpected entry '", f, "' (a writer left a temporary or a directory)");
      names.push_back(f);
    }
    std::sort(names.begin(), names.end());
    for (const auto& f : names) {
      FileDigest d = digest_file(tmp + "/" + f);
      files.push_back({{"file", f}, {"bytes", d.size}, {"crc32", crc_hex(d.crc)}});
    }
    write_json_file(tmp + "/" + kManifestFileName,
                    {{"format", kManifestFormat}, {"version", 1}, {"step", step}, {"files", files}});
    fsync_dir(tmp);
  } catch (...) {
    std::error_code ignore;
    fs::remove_all(tmp, ignore);
    throw;
  }
  if (fs::exists(final_dir, ec)) {
    // Saving a step again (after a resume from an earlier one): move the old one out of the way.
    const std::string old = final_dir + ".old.tmp";
    remove_tree(old);
    if (::rename(final_dir.c_str(), old.c_str()) != 0)
      internal_error(final_dir, ": cannot move the previous copy aside: ", std::strerror(errno));
  }
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0)
    internal_error(tmp, ": cannot rename to ", final_dir, ": ", std::strerror(errno));
  fsync_dir(root_);
  point_latest(name);
  rotate();
  remove_leftovers();
  return final_dir;
}

// ---- contents ---------------------------------------------------------------------------------

void write_model_files(const std::string& dir, const ModelFiles& m) {
  write_file_atomic(dir + "/config.json", m.config_json);
  write_safetensors_dir(dir, m.weights, {}, m.max_shard_bytes);
  if (!m.tokenizer_path.empty()) {
    std::string src = m.tokenizer_path;
    if (fs::is_directory(src)) src += "/tokenizer.json";
    copy_file_atomic(src, dir + "/tokenizer.json");
  }
  write_json_file(dir + "/generation_config.json",
                  {{"_from_model_config", true},
                   {"bos_token_id", m.bos_token_id},
                   {"eos_token_id", m.eos_token_id},
                   {"do_sample", false}});
}

void write_trainer_state(const std::string& dir, const TrainerState& st, const AdamW& opt) {
  std::vector<NamedTensor> moments;
  for (const auto& s : opt.state_tensors()) {
    DSV3_CHECK(s.tensor.device() == Device::CPU, "optimizer state ", s.name,
               " must be copied to the host before saving");
    moments.push_back({s.name, s.tensor});
  }
  write_safetensors(dir + "/" + kOptimizerFileName, moments, {{"format", "pt"}});
  nlohmann::json j = {{"format", kStateFormat},     {"version", 1},
                      {"step", st.step},            {"data", st.data.to_json()},
                      {"optimizer", opt.state_json()}, {"extra", st.extra}};
  write_json_file(dir + "/" + kTrainerStateFileName, j);
}

TrainerState read_trainer_state(const std::string& dir, AdamW& opt) {
  const std::string spath = dir + "/" + kTrainerStateFileName;
  nlohmann::json j = read_json_file(spath);
  TrainerState st;
  try {
    if (j.at("format").get<std::string>() != kStateFormat)
      input_error(spath, ": format is not \"", kStateFormat, "\"");
    if (j.at("version").get<int>() != 1) input_error(spath, ": version ", j.at("version"), " is not 1");
    st.step = j.at("step").get<int64_t>();
    if (st.step < 0) input_error(spath, ": negative step ", st.step);
    st.data = SamplerState::from_json(j.at("data"), spath);
    st.extra = j.value("extra", nlohmann::json::object());
    const std::string opath = dir + "/" + kOptimizerFileName;
    SafetensorsFile f = SafetensorsFile::open(opath);
    auto lookup = [&](const std::string& name) {
      return f.find(name) ? f.tensor(name) : Tensor();
    };
    if (f.size() != opt.state_tensors().size())
      input_error(opath, ": has ", f.size(), " tensors, this model's optimizer has ",
                  opt.state_tensors().size(), " (a checkpoint of another model?)");
    opt.load_state(lookup, j.at("optimizer"), opath);
  } catch (const nlohmann::json::exception& e) {
    input_error(spath, ": ", e.what());
  }
  return st;
}

}  // namespace dsv3
