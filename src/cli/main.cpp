// dsv3: one executable, one subcommand per file in src/cli/.
// Exit codes: 0 ok, 2 usage or input error, 1 internal error.
#include <algorithm>
#include <cstdio>
#include <iostream>

#include "cli/command.h"
#include "core/error.h"

namespace dsv3::cli {

std::vector<CommandDef>& registry() {
  static std::vector<CommandDef> r;
  return r;
}

void note(const std::string& msg) { std::cerr << "dsv3: " << msg << "\n"; }

// CLI11 shows no default for an empty string; show `=""` so that --help lists every option's default.
void show_empty_defaults(CLI::App& app) {
  for (CLI::Option* opt : app.get_options())
    if (opt->get_expected_max() > 0 && !opt->get_required() && opt->get_default_str().empty())
      opt->default_str("\"\"");
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) show_empty_defaults(*sub);
}

}  // namespace dsv3::cli

int main(int argc, char** argv) {
  using namespace dsv3;
  CLI::App app{"dsv3 — DeepSeek-V3 (MLA, DeepSeekMoE, FP8, MTP) and its cluster network, in C++20/CUDA"};
  app.set_version_flag("--version", "dsv3 0.1");
  app.require_subcommand(1, 1);
  app.option_defaults()->always_capture_default();
  app.get_formatter()->column_width(34);

  auto& reg = cli::registry();
  std::sort(reg.begin(), reg.end(), [](auto& a, auto& b) { return a.name < b.name; });
  std::vector<std::pair<CLI::App*, cli::RunFn>> subs;
  for (auto& c : reg) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    sub->option_defaults()->always_capture_default();
    subs.emplace_back(sub, c.setup(*sub));
    cli::show_empty_defaults(*sub);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const CLI::App* where = &app;
    for (auto& [sub, run] : subs)
      if (sub->parsed()) where = sub;
    std::cerr << "dsv3: error: " << e.what() << "\n\n" << where->help();
    return 2;
  }

  std::string name;
  try {
    for (auto& [sub, run] : subs)
      if (sub->parsed()) {
        name = sub->get_name();
        return run();
      }
  } catch (const InputError& e) {
    std::cerr << "dsv3 " << name << ": error: " << e.what() << "\n";
    return 2;
  } catch (const CLI::ParseError& e) {
    std::cerr << "dsv3 " << name << ": error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv3 " << name << ": internal error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
