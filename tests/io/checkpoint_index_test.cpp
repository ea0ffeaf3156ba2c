// Checkpoint directories: single file and sharded (5- and 6-digit shard names), the index parser,
// and hostile or inconsistent indexes.
#include "io/checkpoint_index.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "io_test_util.h"

namespace dsv3 {
namespace {

using test::expect_input_error;
using test::patterned;
using test::same_bytes;
using test::TempDir;
using test::write_all;

std::vector<NamedTensor> model_tensors() {
  return {{"model.embed_tokens.weight", patterned(DType::BF16, {16, 8}, 1)},   // 256 B
          {"model.layers.0.self_attn.q_proj.weight", patterned(DType::F8_E4M3, {8, 8}, 2)},  // 64 B
          {"model.layers.0.self_attn.q_proj.weight_scale_inv", patterned(DType::F32, {1, 1}, 3)},
          {"model.layers.0.mlp.gate.e_score_correction_bias", patterned(DType::F32, {4}, 4)},
          {"model.norm.weight", patterned(DType::BF16, {8}, 5)},
          {"lm_head.weight", patterned(DType::BF16, {16, 8}, 6)}};
}

TEST(CheckpointDir, ShardedRoundTrip) {
  TempDir dir;
  auto in = model_tensors();
  write_safetensors_dir(dir.path, in, {}, 300);  // forces several shards
  EXPECT_FALSE(std::filesystem::exists(dir / kSingleFileName));
  SafetensorsDir d = SafetensorsDir::open(dir.path);
  EXPECT_TRUE(d.sharded());
  ASSERT_EQ(d.shard_files().size(), 3u);
  EXPECT_EQ(d.shard_files()[0], "model-00001-of-00003.safetensors");
  EXPECT_EQ(d.shard_files()[2], "model-00003-of-00003.safetensors");
  ASSERT_EQ(d.size(), in.size());
  uint64_t tensor_bytes = 0, file_bytes = 0;
  for (const NamedTensor& t : in) {
    EXPECT_TRUE(same_bytes(d.tensor(t.name), t.tensor)) << t.name;
    tensor_bytes += t.tensor.nbytes();
  }
  for (const std::string& s : d.shard_files()) {
    file_bytes += std::filesystem::file_size(dir / s);
    EXPECT_EQ(SafetensorsFile::open(dir / s).metadata().at("format"), "pt");
  }
  EXPECT_EQ(d.tensor_bytes(), tensor_bytes);
  EXPECT_EQ(d.index_total_size(), tensor_bytes);
  EXPECT_EQ(d.file_bytes(), file_bytes);
  // The embedding (256 B) fills shard 1; the 300-byte limit moves lm_head to shard 3.
  EXPECT_EQ(d.find("model.embed_tokens.weight")->shard, 0u);
  EXPECT_EQ(d.find("lm_head.weight")->shard, 2u);
  // Opening through the index file's path is the same.
  EXPECT_EQ(SafetensorsDir::open(dir / kIndexFileName).size(), in.size());
}

TEST(CheckpointDir, SingleFileAndLayoutSwitch) {
  TempDir dir;
  auto in = model_tensors();
  write_safetensors_dir(dir.path, in, {}, 300);
  write_safetensors_dir(dir.path, in);  // now fits one file: the stale index must go
  EXPECT_FALSE(std::filesystem::exists(dir / kIndexFileName));
  SafetensorsDir d = SafetensorsDir::open(dir.path);
  EXPECT_FALSE(d.sharded());
  EXPECT_EQ(d.shard_files(), std::vector<std::string>{kSingleFileName});
  for (const NamedTensor& t : in) EXPECT_TRUE(same_bytes(d.tensor(t.name), t.tensor)) << t.name;
  EXPECT_EQ(SafetensorsDir::open(dir / kSingleFileName).size(), in.size());
  write_safetensors_dir(dir.path, in, {}, 300);  // and back: the stale single file must go
  EXPECT_FALSE(std::filesystem::exists(dir / kSingleFileName));
  EXPECT_TRUE(SafetensorsDir::open(dir.path).sharded());
}

TEST(CheckpointDir, SixDigitShardTotalsAsDeepSeekV3Names) {
  TempDir dir;
  auto in = model_tensors();
  write_safetensors(dir / "model-00001-of-000002.safetensors", {in[0], in[1]});
  write_safetensors(dir / "model-00002-of-000002.safetensors", {in[2], in[3], in[4], in[5]});
  std::string index = R"({"metadata": {}, "weight_map": {)";
  for (size_t i = 0; i < in.size(); ++i)
    index += cat(i ? "," : "", "\"", in[i].name, "\": \"model-0000", i < 2 ? 1 : 2, "-of-000002.safetensors\"");
  write_all(dir / kIndexFileName, index + "}}");
  SafetensorsDir d = SafetensorsDir::open(dir.path);
  EXPECT_FALSE(d.index_total_size().has_value());
  EXPECT_EQ(d.shard_files()[1], "model-00002-of-000002.safetensors");
  for (const NamedTensor& t : in) EXPECT_TRUE(same_bytes(d.tensor(t.name), t.tensor)) << t.name;
  expect_input_error([&] { d.tensor("model.layers.1.mlp.gate.weight"); },
                     {"'model.layers.1.mlp.gate.weight'", "not found"});
}

TEST(CheckpointDir, ListsEveryTensorWithDtypeAndShape) {
  TempDir dir;
  write_safetensors_dir(dir.path, model_tensors(), {}, 300);
  SafetensorsDir d = SafetensorsDir::open(dir.path);
  const auto& all = d.tensors();
  ASSERT_EQ(all.size(), 6u);
  EXPECT_EQ(all.begin()->first, "lm_head.weight");  // sorted by name
  const TensorInfo& q = *all.at("model.layers.0.self_attn.q_proj.weight").info;
  EXPECT_EQ(q.dtype_name, "F8_E4M3");
  EXPECT_EQ(q.shape, (std::vector<int64_t>{8, 8}));
}

// A directory with two shards and an index written by hand, for breaking one thing at a time.
struct HandMade {
  TempDir dir;
  HandMade() {
    Tensor a = patterned(DType::F32, {2}, 1), b = patterned(DType::F32, {3}, 2);
    write_safetensors(dir / "s1.safetensors", {{"a", a}});
    write_safetensors(dir / "s2.safetensors", {{"b", b}});
  }
  void index(const std::string& weight_map) {
    write_all(dir / kIndexFileName, R"({"metadata":{"total_size":20},"weight_map":)" + weight_map + "}");
  }
};

TEST(CheckpointDir, HandMadeIndexOpens) {
  HandMade h;
  h.index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  EXPECT_EQ(SafetensorsDir::open(h.dir.path).tensor("b").numel(), 3);
}

TEST(CheckpointDir, MissingShardFile) {
  HandMade h;
  h.index(R"({"a":"s1.safetensors","b":"s3.safetensors"})");
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {kIndexFileName, "missing shard", "'s3.safetensors'"});
}

TEST(CheckpointDir, PathTraversalIsRejected) {
  HandMade h;
  std::filesystem::create_directory(h.dir / "sub");
  for (std::string evil : {"../s1.safetensors", "/etc/passwd.safetensors", "sub/s1.safetensors", "..",
                           "..\\\\s1.safetensors", "s1.bin", ".safetensors", ""}) {
    h.index(R"({"a":"s1.safetensors","b":")" + evil + "\"}");
    expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"'b'", "bad shard name"});
  }
}

TEST(CheckpointDir, WeightMapEntryMissingFromItsShard) {
  HandMade h;
  h.index(R"({"a":"s1.safetensors","b":"s1.safetensors"})");
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"'b'", "missing tensor in shard", "s1.safetensors"});
}

TEST(CheckpointDir, ShardTensorMissingFromWeightMap) {
  HandMade h;
  h.index(R"({"a":"s1.safetensors"})");
  write_safetensors(h.dir / "s1.safetensors", {{"a", patterned(DType::F32, {2}, 1)}, {"stray", patterned(DType::U8, {1}, 3)}});
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"'stray'", "tensor not in weight_map"});
}

TEST(CheckpointDir, AmbiguousOrMissingLayout) {
  HandMade h;
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"no checkpoint"});
  h.index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  write_safetensors(h.dir / kSingleFileName, {});
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"ambiguous checkpoint"});
  expect_input_error([&] { SafetensorsDir::open(h.dir / "nothing"); }, {"no such file"});
}

TEST(CheckpointDir, BadShardInsideAGoodIndexNamesTheShard) {
  HandMade h;
  h.index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  write_all(h.dir / "s2.safetensors", "truncated");
  expect_input_error([&] { SafetensorsDir::open(h.dir.path); }, {"s2.safetensors", "header too large"});
}

TEST(CheckpointDir, WriterRejectsDuplicateNamesBeforeWriting) {
  TempDir dir;
  Tensor x = patterned(DType::F32, {2}, 1);
  expect_input_error([&] { write_safetensors_dir(dir.path, {{"w", x}, {"v", x}, {"w", x}}, {}, 8); },
                     {"duplicate tensor name", "'w'"});
  EXPECT_EQ(dir.count_files(), 0u);
}

TEST(CheckpointIndexParse, AcceptsHubForms) {
  CheckpointIndex a = parse_checkpoint_index(R"({"metadata":{"total_size":688586727753},"weight_map":{}})", "i");
  EXPECT_EQ(a.total_size, 688586727753u);
  CheckpointIndex b = parse_checkpoint_index(R"({"weight_map":{"x":"m.safetensors"},"extra":[1]})", "i");
  EXPECT_FALSE(b.total_size.has_value());
  EXPECT_EQ(b.shard_files(), std::vector<std::string>{"m.safetensors"});
  EXPECT_EQ(parse_checkpoint_index(R"({"metadata":{"total_size":1024.0},"weight_map":{}})", "i").total_size, 1024u);
  CheckpointIndex c = parse_checkpoint_index(checkpoint_index_json(a), "i");
  EXPECT_EQ(c.total_size, a.total_size);
}

TEST(CheckpointIndexParse, RejectsBadIndexes) {
  auto bad = [](const std::string& text, std::initializer_list<std::string> parts) {
    expect_input_error([&] { parse_checkpoint_index(text, "idx.json"); }, parts);
  };
  bad("[]", {"idx.json", "index not a JSON object"});
  bad(R"({"metadata":{}})", {"idx.json", "missing weight_map"});
  bad(R"({"weight_map":[]})", {"bad weight_map"});
  bad(R"({"weight_map":{"w":1}})", {"'w'", "bad shard name"});
  bad(R"({"metadata":{"total_size":-1},"weight_map":{}})", {"total_size"});
  bad(R"({"metadata":{"total_size":"9"},"weight_map":{}})", {"total_size"});
  bad(R"({"metadata":{"total_size":1.5},"weight_map":{}})", {"total_size"});
  bad(R"({"metadata":3,"weight_map":{}})", {"bad metadata"});
  bad(R"({"weight_map":{"w":"a.safetensors","w":"b.safetensors"}})", {"duplicate key", "'w'"});
  bad(R"({"weight_map":{"w":"a.safetensors"})", {"not valid JSON"});
  bad("{\"weight_map\":{\"w\xff\":\"a.safetensors\"}}", {"not UTF-8"});
}

TEST(CheckpointIndexParse, ShardFileNames) {
  EXPECT_EQ(shard_file_name(1, 3), "model-00001-of-00003.safetensors");
  EXPECT_EQ(shard_file_name(163, 163), "model-00163-of-00163.safetensors");
  EXPECT_EQ(shard_file_name(7, 123456), "model-00007-of-123456.safetensors");
  EXPECT_EQ(shard_name_problem("model-00001-of-000163.safetensors"), "");
  EXPECT_NE(shard_name_problem("a/b.safetensors"), "");
}

}  // namespace
}  // namespace dsv3
