// The script contracts of `dsv3 forward` and `dsv3 generate`, through the executable, on the tiny
// v3_hub_yarn_mtp1 fixture (expected logits from transformers, MTP logits from
// tools/mtp_reference.py; see tests/data/fixtures/GENERATED.log).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "cli_util.h"

namespace dsv3::cli_test {
namespace {

const std::string kFixture = "v3_hub_yarn_mtp1";

// The fixture's input_ids, as the "ID ID ..." string the CLI takes.
std::string fixture_ids(const std::map<std::string, StTensor>& expected) {
  std::string s;
  for (double v : expected.at("input_ids").values) {
    if (!s.empty()) s += ' ';
    s += std::to_string(int64_t(v));
  }
  return s;
}

double rel_max_diff(const std::vector<double>& got, const std::vector<double>& ref) {
  double d = 0, m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    d = std::max(d, std::abs(got[i] - ref[i]));
    m = std::max(m, std::abs(ref[i]));
  }
  return d / m;
}

std::vector<int64_t> split_ids(const std::string& line) {
  std::istringstream in(line);
  std::vector<int64_t> out;
  int64_t v;
  while (in >> v) out.push_back(v);
  return out;
}

std::string temp_path(const std::string& name) { return testing::TempDir() + "dsv3_cli_" + name; }

TEST(CliForward, WritesLogitsAndMtpLogitsMatchingTheFixture) {
  const std::string dir = fixture_dir(kFixture);
  const auto expected = read_safetensors_plain(dir + "/expected.safetensors");
  const std::string ids = fixture_ids(expected);
  const int64_t T = int64_t(expected.at("input_ids").values.size());
  const int64_t V = expected.at("logits").shape.at(1);
  const std::string out = temp_path("forward.safetensors");
  std::filesystem::remove(out);

  Result r = dsv3("forward -m " + dir + " --tokens \"" + ids + "\" --output " + out + " --threads 1", true);
  ASSERT_EQ(r.status, 0) << r.out;
  const auto got = read_safetensors_plain(out);
  ASSERT_EQ(got.count("logits"), 1u);
  ASSERT_EQ(got.count("mtp_logits_1"), 1u);
  EXPECT_EQ(got.count("mtp_logits_2"), 0u);  // the fixture has one MTP module
  EXPECT_EQ(got.at("logits").dtype, "F32");
  EXPECT_EQ(got.at("mtp_logits_1").dtype, "F32");
  EXPECT_EQ(got.at("logits").shape, (std::vector<int64_t>{T, V}));
  EXPECT_EQ(got.at("mtp_logits_1").shape, (std::vector<int64_t>{T - 1, V}));
  // The FP32 tolerance of docs (max|Δ|/max|ref| against the float64 reference).
  EXPECT_LT(rel_max_diff(got.at("logits").values, expected.at("logits").values), 1e-4);
  EXPECT_LT(rel_max_diff(got.at("mtp_logits_1").values, expected.at("mtp_logits_1").values), 1e-4);

  // --no-mtp writes the main logits only, the same values.
  Result n = dsv3("forward -m " + dir + " --tokens \"" + ids + "\" --output " + out + " --no-mtp --threads 1");
  ASSERT_EQ(n.status, 0);
  const auto plain = read_safetensors_plain(out);
  EXPECT_EQ(plain.count("mtp_logits_1"), 0u);
  EXPECT_EQ(plain.at("logits").values, got.at("logits").values);
}

TEST(CliForward, BadInputExitsTwoNamingTheProblem) {
  const std::string dir = fixture_dir(kFixture);
  const std::string out = temp_path("forward_bad.safetensors");
  std::filesystem::remove(out);
  struct Case {
    std::string args, named;
  };
  const Case cases[] = {
      {"-m /nonexistent/model_dir --tokens \"1 2\"", "/nonexistent/model_dir"},
      {"-m " + dir + " --tokens \"1 x2 3\"", "x2"},
      {"-m " + dir + " --tokens \"1 160\"", "160"},  // vocab_size is 160
      {"-m " + dir + " --tokens \"1 -1\"", "-1"},
      {"-m " + dir + " --tokens \"\"", "--tokens"},
  };
  for (const Case& c : cases) {
    Result r = dsv3("forward " + c.args + " --output " + out, true);
    EXPECT_EQ(r.status, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.named), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_FALSE(std::filesystem::exists(out)) << c.args;
  }
  Result r = dsv3("forward -m " + dir + " --tokens \"1 160\" --output " + out, true);
  EXPECT_NE(r.out.find("vocabulary"), std::string::npos) << r.out;
}

// Greedy ids from `dsv3 generate ... --print-ids` (stdout only), 8 tokens.
std::vector<int64_t> greedy_ids(const std::string& ids, const std::string& extra) {
  Result r = dsv3("generate -m " + fixture_dir(kFixture) + " --prompt-ids \"" + ids +
                  "\" -n 8 --temp 0 --print-ids --threads 1 --cache-mb 1 " + extra);
  EXPECT_EQ(r.status, 0) << extra;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << "one line expected: " << r.out;
  return split_ids(r.out);
}

TEST(CliGenerate, GreedyIdsUnchangedBySpeculationAndAgreeWithForward) {
  const std::string dir = fixture_dir(kFixture);
  const auto expected = read_safetensors_plain(dir + "/expected.safetensors");
  const std::string ids = fixture_ids(expected);

  const std::vector<int64_t> plain = greedy_ids(ids, "--ignore-eos");
  ASSERT_EQ(plain.size(), 8u);
  EXPECT_EQ(greedy_ids(ids, "--ignore-eos --mtp 1"), plain);
  EXPECT_EQ(greedy_ids(ids, "--ignore-eos --mtp 2"), plain);
  // Without --ignore-eos the output is a prefix ending at EOS (id 1) or the same 8 tokens.
  const std::vector<int64_t> eos = greedy_ids(ids, "");
  EXPECT_EQ(greedy_ids(ids, "--mtp 2"), eos);
  ASSERT_FALSE(eos.empty());
  EXPECT_TRUE(std::equal(eos.begin(), eos.end(), plain.begin()));
  // F32 matrices rounded to BF16 at load: a different model, so only that it decodes.
  EXPECT_EQ(greedy_ids(ids, "--ignore-eos --weights bf16").size(), 8u);
  // Likewise the matrices quantized to FP8 blocks at load (V3's release format).
  EXPECT_EQ(greedy_ids(ids, "--ignore-eos --weights fp8").size(), 8u);

  // The first generated token is the argmax of forward's last row over the same prompt, and each
  // next one the argmax after appending the previous (checked for the first three).
  std::string seq = ids;
  const std::string out = temp_path("generate_forward.safetensors");
  for (size_t k = 0; k < 3; ++k) {
    Result r = dsv3("forward -m " + dir + " --tokens \"" + seq + "\" --output " + out + " --no-mtp --threads 1");
    ASSERT_EQ(r.status, 0);
    const StTensor logits = read_safetensors_plain(out).at("logits");
    const int64_t T = logits.shape[0], V = logits.shape[1];
    const auto last = logits.values.begin() + (T - 1) * V;
    EXPECT_EQ(int64_t(std::max_element(last, last + V) - last), plain[k]) << "generated token " << k;
    seq += ' ';
    seq += std::to_string(plain[k]);
  }
}

TEST(CliGenerate, InvalidSamplingValuesNameTheFlag) {
  const std::string base = "generate -m " + fixture_dir(kFixture) + " --prompt-ids \"0 5 7\" --print-ids ";
  for (const std::string flag : {"--top-p 1.5", "--top-p 0", "--temp -1", "--min-p 2", "--top-k -3",
                                 "--repeat-penalty 0", "--mtp 17", "-n 0", "--device tpu", "--weights f16",
                                 "--cache-mb inf", "--cache-mb 1e30", "--cache-mb -2"}) {
    Result r = dsv3(base + flag, true);
    EXPECT_EQ(r.status, 2) << flag << "\n" << r.out;
    const std::string name = flag.substr(0, flag.find(' '));
    EXPECT_NE(r.out.find(name), std::string::npos) << flag << "\n" << r.out;
  }
  Result r = dsv3(base + "--top-p nan", true);
  EXPECT_EQ(r.status, 2) << r.out;
  // A prompt id outside the vocabulary is named too.
  Result big = dsv3("generate -m " + fixture_dir(kFixture) + " --prompt-ids \"0 999\" -n 2 --print-ids", true);
  EXPECT_EQ(big.status, 2) << big.out;
  EXPECT_NE(big.out.find("999"), std::string::npos) << big.out;
  // Ids errors name this command's flag, not dsv3 forward's --tokens.
  for (const std::string ids : {"0 999", "0 x2", " "}) {
    Result bad = dsv3("generate -m " + fixture_dir(kFixture) + " --prompt-ids \"" + ids + "\" -n 2 --print-ids", true);
    EXPECT_EQ(bad.status, 2) << ids << "\n" << bad.out;
    EXPECT_NE(bad.out.find("--prompt-ids"), std::string::npos) << ids << "\n" << bad.out;
    EXPECT_EQ(bad.out.find("--tokens"), std::string::npos) << ids << "\n" << bad.out;
  }
}

}  // namespace
}  // namespace dsv3::cli_test
