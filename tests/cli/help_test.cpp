// The usage contract: `dsv3 --help` and every `dsv3 SUB [SUB] --help` exit 0 and list every option
// with its default; an unknown flag or a bad value gives exit 2 and the usage.
#include <gtest/gtest.h>

#include <algorithm>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "cli_util.h"

namespace dsv3::cli_test {
namespace {

// The subcommand names listed under "Subcommands:" in a help text.
std::vector<std::string> subcommands_of(const std::string& help) {
  std::vector<std::string> out;
  std::istringstream in(help);
  std::string line;
  bool in_list = false;
  while (std::getline(in, line)) {
    if (line == "Subcommands:") {
      in_list = true;
      continue;
    }
    if (!in_list) continue;
    if (line.empty() || line[0] != ' ') break;
    std::istringstream words(line);
    std::string name;
    words >> name;
    out.push_back(name);
  }
  return out;
}

// Option lines of the "Options:" section that take a value but show no default: such a line
// reads "  NAMES TYPE ..." where TYPE (TEXT, INT, FLOAT, UINT, ...) is not followed by "=" and
// the option is not REQUIRED. Flags show no TYPE and no default (they are off unless given).
std::vector<std::string> options_without_default(const std::string& help) {
  static const std::regex with_value(R"(^  (-[^ ]+) ([A-Z]+)(:[^ =]+)?(=| |$)(.*))");
  static const std::regex flag_with_value(R"(^  -[^ =]+=)");
  std::vector<std::string> bad;
  std::istringstream in(help);
  std::string line;
  bool in_opts = false;
  while (std::getline(in, line)) {
    if (line == "Options:") {
      in_opts = true;
      continue;
    }
    if (in_opts && (line.empty() || line[0] != ' ')) in_opts = false;
    std::smatch m;
    if (in_opts && std::regex_search(line, flag_with_value)) bad.push_back(line);  // a flag shows no value
    if (!in_opts || !std::regex_search(line, m, with_value)) continue;
    if (m[4] != "=" && m[5].str().find("REQUIRED") == std::string::npos) bad.push_back(line);
  }
  return bad;
}

TEST(CliHelp, EveryCommandListsEveryOptionWithItsDefault) {
  Result top = dsv3("--help");
  ASSERT_EQ(top.status, 0);
  std::vector<std::string> pending = subcommands_of(top.out);
  // The registered subcommands of the design (DESIGN §1) that exist now must all be listed.
  for (const char* name : {"forward", "generate", "info", "tokenizer", "train"})
    EXPECT_NE(std::find(pending.begin(), pending.end(), name), pending.end()) << name;
  size_t checked = 0, options = 0;
  while (!pending.empty()) {
    const std::string cmd = pending.back();
    pending.pop_back();
    Result r = dsv3(cmd + " --help");
    EXPECT_EQ(r.status, 0) << cmd;
    EXPECT_NE(r.out.find("Usage:"), std::string::npos) << cmd;
    for (const std::string& line : options_without_default(r.out)) ADD_FAILURE() << "dsv3 " << cmd << ": no default: " << line;
    for (const std::string& s : subcommands_of(r.out)) pending.push_back(cmd + " " + s);
    options += size_t(std::count(r.out.begin(), r.out.end(), '\n'));
    ++checked;
  }
  EXPECT_GE(checked, 10u);  // tokenizer, net and data have subcommands of their own
  EXPECT_GT(options, 50u);
}

TEST(CliHelp, TheDefaultCheckSeesAMissingDefault) {
  // The checker itself: a value option with no "=" default and not REQUIRED is reported.
  const std::string help = "Options:\n  -h,--help     Print\n  -m,--model TEXT REQUIRED  dir\n"
                           "  --x INT=3    x\n  --y TEXT     y\n  --z    flag\n  --w TEXT:{a,b}=a   w\n  --f=\"\"   f\n";
  EXPECT_EQ(options_without_default(help), (std::vector<std::string>{"  --y TEXT     y", "  --f=\"\"   f"}));
}

TEST(CliHelp, UnknownFlagOrBadValueGivesExitTwoAndUsage) {
  for (const std::string args : {"--no-such-flag", "no-such-subcommand", ""}) {
    Result r = dsv3(args, true);
    EXPECT_EQ(r.status, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find("Usage:"), std::string::npos) << args << "\n" << r.out;
  }
  // Within a subcommand the message names the flag (or the value) and the usage printed is the
  // subcommand's.
  struct Case {
    std::string args, named, usage_mentions;
  };
  const Case cases[] = {
      {"info --preset tiny --no-such-flag", "--no-such-flag", "--preset"},
      {"forward -m x --tokens 1 --output y --bogus", "--bogus", "--tokens"},
      {"generate -m x --temp abc", "abc", "--top-p"},
      {"tokenizer encode --tokenizer x --wat", "--wat", "--bos"},
  };
  for (const Case& c : cases) {
    Result r = dsv3(c.args, true);
    EXPECT_EQ(r.status, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find("error"), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.named), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find("Usage:"), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.usage_mentions), std::string::npos) << c.args << "\n" << r.out;
  }
}

}  // namespace
}  // namespace dsv3::cli_test
