#include "cli/command.h"

DSV3_COMMAND(info, "Summarise a model configuration", [](CLI::App& app) {
  auto preset = std::make_shared<std::string>("v3");
  app.add_option("--preset", *preset, "Built-in preset");
  return [preset] { return 0; };
});
