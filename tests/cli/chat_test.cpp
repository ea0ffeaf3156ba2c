// `dsv3 chat` end to end on the CPU: turns read from stdin are answered with the chat template,
// greedy replies are reproducible, "/reset" starts the conversation over, a later turn sees the
// earlier ones, and a model directory without a tokenizer is an error naming it.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "chat_model.h"
#include "cli_util.h"

namespace dsv3::cli_test {
namespace {

// Written once per process, removed at exit.
const std::string& model() {
  static const ChatModelDir dir("dsv3_chat");
  return dir.path;
}

// The replies (stdout) to the turns in `input` (one per line), greedy, 6 tokens at most each.
Result chat(const std::string& input, const std::string& flags = "", bool merge_stderr = false) {
  const std::string path = model() + "/turns.txt";
  std::ofstream(path) << input;
  return dsv3("chat -m " + model() + " -q --temp 0 -n 6 --threads 1 " + flags + " < " + path, merge_stderr);
}

TEST(CliChat, GreedyRepliesAreReproducibleAndResetStartsOver) {
  const Result one = chat("hello there\n");
  ASSERT_EQ(one.status, 0) << one.out;
  ASSERT_FALSE(one.out.empty());
  EXPECT_EQ(chat("hello there\n").out, one.out);
  // After /reset the same question gets the same reply; /exit ends the session before the last line.
  const Result reset = chat("hello there\n/reset\nhello there\n/exit\nnever read\n");
  ASSERT_EQ(reset.status, 0) << reset.out;
  EXPECT_EQ(reset.out, one.out + one.out);
  // A second turn is answered with the first in its context: the output starts with the first reply.
  const Result two = chat("hello there\nand again\n");
  ASSERT_EQ(two.status, 0) << two.out;
  EXPECT_EQ(two.out.substr(0, one.out.size()), one.out);
  EXPECT_GT(two.out.size(), one.out.size());
}

// A turn the context cannot take is refused with the reason, dropped from the conversation, and the
// session goes on: the next turn is answered as if the long one had never been sent.
TEST(CliChat, TooLongTurnIsDroppedAndTheSessionGoesOn) {
  const std::string ctx = "-c 64";
  const Result plain = chat("hello there\nhello there\n", ctx);
  ASSERT_EQ(plain.status, 0) << plain.out;
  std::string long_line;
  for (int i = 0; i < 60; ++i) long_line += "word ";
  const Result r = chat("hello there\n" + long_line + "\nhello there\n", ctx);
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(r.out, plain.out);
  const Result said = chat("hello there\n" + long_line + "\nhello there\n", ctx, true);
  EXPECT_NE(said.out.find("longer than the context"), std::string::npos) << said.out;
  EXPECT_NE(said.out.find("the message was dropped"), std::string::npos) << said.out;
}

// The timing lines are each turn's own: the same turn after /reset reports the same speculation
// counts (they used to add up over the session).
TEST(CliChat, TimingLinesArePerTurn) {
  const Result r = dsv3("chat -m " + model() + " --temp 0 -n 6 --threads 1 --mtp 1 < " + [] {
    const std::string path = model() + "/turns_timing.txt";
    std::ofstream(path) << "hello there\n/reset\nhello there\n";
    return path;
  }(), true);
  ASSERT_EQ(r.status, 0) << r.out;
  std::vector<std::string> spec;
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);)
    if (line.find("speculation =") != std::string::npos || line.find("accepted draft") != std::string::npos)
      spec.push_back(line.substr(line.find_first_not_of(" >")));
  ASSERT_EQ(spec.size(), 4u) << r.out;  // per turn: the speculation line and draft 1's rate
  EXPECT_EQ(spec[2], spec[0]) << r.out;
  EXPECT_EQ(spec[3], spec[1]) << r.out;
}

TEST(CliChat, ModelWithoutTokenizerIsAnErrorNamingIt) {
  const Result r = dsv3("chat -m " + fixture_dir("v3_hub_yarn_mtp1") + " -q < /dev/null", true);
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("tokenizer.json"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dsv3::cli_test
