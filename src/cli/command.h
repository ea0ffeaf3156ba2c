// Subcommand registry. Each src/cli/<name>.cpp registers one subcommand:
//
//   DSV3_COMMAND(info, "Summarise a model configuration", [](CLI::App& app) {
//     auto o = std::make_shared<InfoOptions>();
//     app.add_option("--preset", o->preset, "...");
//     return [o] { return run_info(*o); };   // runs after a successful parse, returns exit code
//   });
//
// Throw InputError for bad input (exit 2) — the driver prints the message and the usage.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace dsv3::cli {

using RunFn = std::function<int()>;
using SetupFn = std::function<RunFn(CLI::App&)>;

struct CommandDef {
  std::string name, help;
  SetupFn setup;
};

std::vector<CommandDef>& registry();

struct Registrar {
  Registrar(const char* name, const char* help, SetupFn setup) {
    registry().push_back({name, help, std::move(setup)});
  }
};

// Log a line to stderr with the program prefix (progress and diagnostics; stdout is for results).
void note(const std::string& msg);

}  // namespace dsv3::cli

#define DSV3_COMMAND(name, help, setup) \
  static ::dsv3::cli::Registrar dsv3_command_##name(#name, help, setup)
