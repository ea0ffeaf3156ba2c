// The reproducible experiments of research/network.md §6 (E1, E2 sweep, E3, E4, E7, E8, E9): each
// returns a table, JSON (with the paper's numbers beside ours) and plots.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "net/report.h"

namespace dsv3::net {

struct ExperimentOutput {
  std::string name;  // file stem: net_<name>
  std::string title;
  Table table;
  nlohmann::json json;
  std::vector<std::pair<std::string, Chart>> charts;  // (file suffix, chart)
  std::vector<std::string> notes;
};

// quick = smaller instances (for tests and fast checks); the committed results use quick = false.
ExperimentOutput experiment_e1();
ExperimentOutput experiment_sweep(const std::vector<int>& radices, int64_t n_min, int64_t n_max);
ExperimentOutput experiment_e3(bool quick);
ExperimentOutput experiment_e4(bool quick);
ExperimentOutput experiment_e7(bool quick);
ExperimentOutput experiment_e8(bool quick);
ExperimentOutput experiment_e9(bool quick);

// id: E1 E2 E3 E4 E7 E8 E9 (case-insensitive); InputError otherwise.
ExperimentOutput run_experiment(const std::string& id, bool quick);

// Writes <dir>/net_<name>.json, .csv, .txt and one .svg per chart; returns the paths.
std::vector<std::string> write_experiment(const ExperimentOutput& e, const std::string& dir);

}  // namespace dsv3::net
