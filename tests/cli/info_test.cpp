// `dsv3 info` through the executable: the JSON contract and the errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cli_util.h"

namespace {

using dsv3::cli_test::dsv3;
using dsv3::cli_test::Result;

TEST(CliInfo, V3Json) {
  Result r = dsv3("info --preset v3 --json");
  ASSERT_EQ(r.status, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["kv_bytes_per_token_latent_bf16"], 70272);
  EXPECT_EQ(j["kv_bytes_per_token_latent_fp8"], 35136);
  EXPECT_EQ(j["kv_bytes_per_token_naive_bf16"], 128 * (192 + 128) * 2 * 61);
  // 671B main model total, about 37B activated (release README and paper).
  const double total = j["params_total"].get<double>(), active = j["params_active"].get<double>();
  EXPECT_NEAR(total / 1e9, 671.0, 0.5);
  EXPECT_NEAR(active / 1e9, 37.0, 1.0);
  EXPECT_EQ(j["params_embedding"], 129280 * 7168);
  EXPECT_EQ(j["params_head"], 129280 * 7168);
  EXPECT_GT(j["params_mtp_total"].get<double>(), 11e9);
  EXPECT_EQ(j["seq_len"], 4096);
  EXPECT_NEAR(j["train_flops_per_token"].get<double>() / 1e9, 250.0, 2.5);
  EXPECT_EQ(j["config"]["hidden_size"], 7168);
  EXPECT_EQ(j["model_type"], "deepseek_v3");
}

TEST(CliInfo, TextAndSeqLen) {
  Result r = dsv3("info --preset tiny --seq-len 128");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("parameters"), std::string::npos);
  EXPECT_NE(r.out.find("sequence length 128"), std::string::npos);
  Result j = dsv3("info --preset tiny --seq-len 128 --json");
  ASSERT_EQ(j.status, 0);
  EXPECT_EQ(nlohmann::json::parse(j.out)["seq_len"], 128);
}

TEST(CliInfo, ModelDirectory) {
  const std::string dir = testing::TempDir() + "dsv3_info_model";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(std::string(DSV3_SOURCE_DIR) + "/tests/data/configs/deepseek_v2_lite_hub.json",
                             dir + "/config.json", std::filesystem::copy_options::overwrite_existing);
  Result r = dsv3("info -m " + dir + " --json");
  ASSERT_EQ(r.status, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["model_type"], "deepseek_v2");
  EXPECT_EQ(j["kv_bytes_per_token_latent_bf16"], (512 + 64) * 2 * 27);
  EXPECT_NEAR(j["params_total"].get<double>() / 1e9, 15.7, 0.05);
  EXPECT_EQ(j["checkpoint"]["safetensors_files"], 0);

  // A bad field: exit 2 and the message names the file and the field.
  std::ofstream(dir + "/config.json") << R"({"model_type": "deepseek_v3", "vocab_size": "many"})";
  Result bad = dsv3("info -m " + dir, true);
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.out.find("config.json: field 'vocab_size'"), std::string::npos) << bad.out;
}

TEST(CliInfo, Errors) {
  EXPECT_EQ(dsv3("info --preset nope").status, 2);
  EXPECT_EQ(dsv3("info -m /nonexistent/dir").status, 2);
  EXPECT_EQ(dsv3("info --preset tiny -m /tmp").status, 2);
  EXPECT_EQ(dsv3("info --preset tiny --seq-len 0").status, 2);
}

}  // namespace
