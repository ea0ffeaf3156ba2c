// safetensors reader and writer: round trips, layout, alignment, and one handcrafted bad file per
// rule of the reference validator.
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>

#include "io/mmap_file.h"
#include "io_test_util.h"

namespace dsv3 {
namespace {

using test::expect_input_error;
using test::patterned;
using test::same_bytes;
using test::st_bytes;
using test::TempDir;

const DType kAll[] = {DType::F32, DType::F64,     DType::BF16, DType::F16, DType::F8_E4M3,
                      DType::F8_E5M2, DType::I64, DType::I32,  DType::U8};

TEST(Safetensors, RoundTripEveryDtypeThroughAFile) {
  TempDir dir;
  std::vector<NamedTensor> in;
  int seed = 0;
  for (DType t : kAll) {
    in.push_back({cat("t.", dtype_name(t)), patterned(t, {3, 5}, seed++)});
    in.push_back({cat("odd.", dtype_name(t)), patterned(t, {7}, seed++)});  // odd sizes shift offsets
  }
  Metadata meta = {{"format", "pt"}, {"note", "ünïcode \"quoted\"\n"}};
  std::string path = dir / "m.safetensors";
  uint64_t written = write_safetensors(path, in, meta);
  SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.file_size(), written);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.size(), in.size());
  for (const NamedTensor& t : in) {
    Tensor got = f.tensor(t.name);
    EXPECT_TRUE(same_bytes(got, t.tensor)) << t.name;
    EXPECT_FALSE(got.owns_memory()) << t.name << " should be borrowed from the mapping (aligned)";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.raw()) % dtype_size(t.tensor.dtype()), 0u);
    EXPECT_EQ(f.info(t.name).dtype_name, dtype_name(t.tensor.dtype()));
  }
  // The borrowed tensor keeps the mapping alive after the file object is gone.
  Tensor keep = f.tensor("t.F32");
  f = SafetensorsFile();
  EXPECT_TRUE(same_bytes(keep, in[0].tensor));
}

TEST(Safetensors, WritingABorrowedTensorNeverTouchesTheFile) {
  TempDir dir;
  std::string path = dir / "m.safetensors";
  Tensor x = patterned(DType::F32, {4}, 3);
  write_safetensors(path, {{"x", x}});
  std::string before = test::read_all(path);
  Tensor y = SafetensorsFile::open(path).tensor("x");
  ASSERT_FALSE(y.owns_memory());
  y.fill(7.0f);  // the mapping is private: the write lands in a private page copy
  EXPECT_EQ(y.data<float>()[3], 7.0f);
  EXPECT_EQ(test::read_all(path), before);
}

TEST(Safetensors, ScalarsAndZeroSizeTensors) {
  std::vector<NamedTensor> in = {{"scalar", patterned(DType::F64, Shape{}, 1)},
                                 {"empty_rows", Tensor::empty(DType::F32, {0, 3})},
                                 {"empty_cols", Tensor::empty(DType::BF16, {5, 0})},
                                 {"u8", patterned(DType::U8, {3}, 2)}};
  SafetensorsFile f = SafetensorsFile::from_bytes(serialize_safetensors(in), "mem");
  EXPECT_EQ(f.info("scalar").shape.size(), 0u);
  EXPECT_EQ(f.info("scalar").numel(), 1);
  EXPECT_EQ(f.info("empty_rows").nbytes(), 0u);
  for (const NamedTensor& t : in) EXPECT_TRUE(same_bytes(f.tensor(t.name), t.tensor)) << t.name;
  EXPECT_EQ(f.tensor("scalar").ndim(), 0);
  EXPECT_EQ(f.tensor("empty_cols").shape(), (Shape{5, 0}));
}

TEST(Safetensors, EmptyFileListIsTheReferenceBytes) {
  // The spec's smallest file: "{}" padded with spaces to 8 bytes.
  EXPECT_EQ(serialize_safetensors({}), st_bytes("{}      "));
  EXPECT_EQ(SafetensorsFile::from_bytes(st_bytes("{}      "), "mem").size(), 0u);
}

TEST(Safetensors, HeaderLayoutMatchesTheFormat) {
  Tensor x = Tensor::empty(DType::F32, {1, 2, 3});
  for (int i = 0; i < 6; ++i) x.data<float>()[i] = float(i);
  std::string bytes = serialize_safetensors({{"attn.0", x}});
  std::string header = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header.size(), 64u);  // already a multiple of 8: no padding
  std::string data(reinterpret_cast<const char*>(x.raw()), 24);
  EXPECT_EQ(bytes, st_bytes(header, data));

  std::string padded = serialize_safetensors({{"attn0", x.reshape({1, 1, 2, 3})}});
  EXPECT_EQ(padded.substr(8, 72),
            std::string(R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})") + "       ");
}

TEST(Safetensors, WriterOrdersByAlignmentThenNameAndPutsMetadataFirst) {
  std::vector<NamedTensor> in = {{"a", patterned(DType::U8, {3}, 1)},
                                 {"d", patterned(DType::F32, {1}, 2)},
                                 {"c", patterned(DType::F64, {1}, 3)},
                                 {"b", patterned(DType::F32, {1}, 4)},
                                 {"e", patterned(DType::BF16, {1}, 5)}};
  std::string bytes = serialize_safetensors(in, {{"format", "pt"}});
  SafetensorsFile f = SafetensorsFile::from_bytes(bytes, "mem");
  auto range = [&](const char* n) { return std::make_pair(f.info(n).begin, f.info(n).end); };
  EXPECT_EQ(range("c"), std::make_pair(uint64_t(0), uint64_t(8)));
  EXPECT_EQ(range("b"), std::make_pair(uint64_t(8), uint64_t(12)));
  EXPECT_EQ(range("d"), std::make_pair(uint64_t(12), uint64_t(16)));
  EXPECT_EQ(range("e"), std::make_pair(uint64_t(16), uint64_t(18)));
  EXPECT_EQ(range("a"), std::make_pair(uint64_t(18), uint64_t(21)));
  EXPECT_EQ(bytes.substr(8, 31), R"({"__metadata__":{"format":"pt"})");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(Safetensors, UnalignedDataIsCopiedCorrectly) {
  // A U8 tensor of 1 byte first pushes the F32 tensor to an odd address.
  float vals[3] = {1.5f, -2.25f, 1e-30f};
  std::string data = "\x2a" + std::string(reinterpret_cast<const char*>(vals), 12);
  std::string header =
      R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bytes = st_bytes(header, data);
  TempDir dir;
  test::write_all(dir / "u.safetensors", bytes);
  for (const SafetensorsFile& f :
       {SafetensorsFile::from_bytes(bytes, "mem"), SafetensorsFile::open(dir / "u.safetensors")}) {
    Tensor w = f.tensor("w");
    EXPECT_TRUE(w.owns_memory()) << "an unaligned F32 tensor must be copied";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(w.raw()) % 4, 0u);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(w.data<float>()[i], vals[i]);
    EXPECT_FALSE(f.tensor("b").owns_memory());  // bytes are always aligned
    EXPECT_EQ(f.tensor("b").data<uint8_t>()[0], 0x2a);
  }
}

TEST(Safetensors, WhitespaceAroundTheHeaderIsAccepted) {
  std::string body = R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  for (std::string h : {" \n\t\r" + body, body + "   \n", "\n" + body + "\t"}) {
    SafetensorsFile f = SafetensorsFile::from_bytes(st_bytes(h, "ab"), "mem");
    EXPECT_EQ(f.tensor("x").data<uint8_t>()[1], 'b');
  }
}

TEST(Safetensors, OtherFormatDtypesParseButCannotBecomeTensors) {
  std::string h =
      R"({"i16":{"dtype":"I16","shape":[2],"data_offsets":[0,4]},"f4":{"dtype":"F4","shape":[2],"data_offsets":[4,5]},)"
      R"("six":{"dtype":"U8","shape":[1,1,1,1,1,1],"data_offsets":[5,6]}})";
  SafetensorsFile f = SafetensorsFile::from_bytes(st_bytes(h, "abcdef"), "x.safetensors");
  EXPECT_EQ(f.info("i16").dtype_name, "I16");
  EXPECT_FALSE(f.info("i16").dtype.has_value());
  EXPECT_EQ(f.info("f4").nbytes(), 1u);
  EXPECT_EQ(*f.info("six").dtype, DType::U8);
  expect_input_error([&] { f.tensor("i16"); }, {"x.safetensors", "'i16'", "unsupported dtype", "I16"});
  expect_input_error([&] { f.tensor("six"); }, {"x.safetensors", "'six'", "too many dims"});
  expect_input_error([&] { f.tensor("nope"); }, {"x.safetensors", "'nope'", "not found"});
}

TEST(Safetensors, MetadataNullMeansNone) {
  SafetensorsFile f = SafetensorsFile::from_bytes(st_bytes(R"({"__metadata__":null})"), "mem");
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, OpenRejectsMissingDirectoryAndEmptyFiles) {
  TempDir dir;
  expect_input_error([&] { SafetensorsFile::open(dir / "none.safetensors"); }, {"none.safetensors", "cannot open"});
  expect_input_error([&] { SafetensorsFile::open(dir.path); }, {dir.path, "not a regular file"});
  test::write_all(dir / "empty.safetensors", "");
  expect_input_error([&] { SafetensorsFile::open(dir / "empty.safetensors"); },
                     {"empty.safetensors", "file too small"});
}

TEST(Safetensors, WriterRejectsBadNames) {
  Tensor x = Tensor::zeros(DType::F32, {1});
  expect_input_error([&] { serialize_safetensors({{"w", x}, {"w", x}}); }, {"duplicate tensor name", "'w'"});
  expect_input_error([&] { serialize_safetensors({{"__metadata__", x}}); }, {"reserved"});
  expect_input_error([&] { serialize_safetensors({{"bad\xff", x}}); }, {"not UTF-8"});
  expect_input_error([&] { serialize_safetensors({}, {{"k", "\xc0\x80"}}); }, {"not UTF-8"});
}

// ---- one handcrafted bad file per rule -------------------------------------------------------

void expect_bad(const std::string& bytes, std::initializer_list<std::string> parts) {
  std::vector<std::string> all(parts);
  all.push_back("bad.safetensors");
  try {
    SafetensorsFile::from_bytes(bytes, "bad.safetensors");
    ADD_FAILURE() << "accepted a file that breaks '" << *parts.begin() << "'";
  } catch (const InputError& e) {
    std::string msg = e.what();
    for (const std::string& p : all) EXPECT_NE(msg.find(p), std::string::npos) << "lacks '" << p << "': " << msg;
  }
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                  uint64_t e) {
  return cat("\"", name, "\":{\"dtype\":\"", dtype, "\",\"shape\":", shape, ",\"data_offsets\":[", b, ",", e, "]}");
}

TEST(SafetensorsBad, FileTooSmall) {
  expect_bad("", {"file too small"});
  expect_bad(std::string(7, '\0'), {"file too small"});
}

TEST(SafetensorsBad, HeaderTooLarge) {
  std::string n(8, '\0');
  uint64_t big = kSafetensorsMaxHeader + 1;
  std::memcpy(n.data(), &big, 8);
  expect_bad(n + "{}", {"header too large", "100000001"});
  expect_bad(std::string(8, '\xff') + "{}", {"header too large"});
}

TEST(SafetensorsBad, HeaderPastEndOfFile) {
  std::string b = st_bytes("{}      ");
  b.pop_back();  // the header claims 8 bytes, 7 remain
  expect_bad(b, {"header past end of file"});
}

TEST(SafetensorsBad, HeaderNotUtf8) {
  expect_bad(st_bytes("{\"w\xff\":{}}"), {"not UTF-8"});
  expect_bad(st_bytes("{\"\xed\xa0\x80\":{}}"), {"not UTF-8"});  // a UTF-16 surrogate
}

TEST(SafetensorsBad, HeaderNotJson) {
  expect_bad(st_bytes("{\"w\":"), {"not valid JSON"});
  expect_bad(st_bytes(std::string("{}\0\0\0\0\0\0", 8)), {"not valid JSON"});  // NUL padding is not whitespace
  expect_bad(st_bytes("{} {}"), {"not valid JSON"});
}

TEST(SafetensorsBad, HeaderNotAnObject) {
  expect_bad(st_bytes("[1, 2]"), {"header not a JSON object", "array"});
  expect_bad(st_bytes("7"), {"header not a JSON object"});
}

TEST(SafetensorsBad, DuplicateTensorName) {
  expect_bad(st_bytes("{" + entry("w", "U8", "[1]", 0, 1) + "," + entry("w", "U8", "[1]", 1, 2) + "}", "ab"),
             {"duplicate key", "'w'"});
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "a"),
             {"duplicate key", "'dtype'"});
}

TEST(SafetensorsBad, NestedTooDeep) {
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", "a"), {"nested too deep"});
  expect_bad(st_bytes(std::string(100000, '[') + std::string(100000, ']')), {"nested too deep"});
}

TEST(SafetensorsBad, MetadataNotStringToString) {
  expect_bad(st_bytes(R"({"__metadata__":{"format":"pt","epoch":3}})"),
             {"__metadata__ not string to string", "'epoch'"});
  expect_bad(st_bytes(R"({"__metadata__":["pt"]})"), {"__metadata__ not string to string"});
}

TEST(SafetensorsBad, TensorEntryNotAnObject) {
  expect_bad(st_bytes(R"({"w":[0,1]})"), {"tensor entry not an object", "'w'"});
}

TEST(SafetensorsBad, TensorEntryMissingKey) {
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","shape":[1]}})", "a"), {"tensor entry missing key", "'w'", "data_offsets"});
}

TEST(SafetensorsBad, TensorEntryUnknownKey) {
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"stride":[1]}})", "a"),
             {"tensor entry unknown key", "'w'", "'stride'"});
}

TEST(SafetensorsBad, UnknownDtype) {
  expect_bad(st_bytes("{" + entry("w", "F31", "[1]", 0, 4) + "}", "abcd"), {"unknown dtype", "'w'", "'F31'"});
  expect_bad(st_bytes(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "abcd"), {"unknown dtype", "'w'"});
}

TEST(SafetensorsBad, BadShape) {
  expect_bad(st_bytes("{" + entry("w", "U8", "[-1]", 0, 0) + "}"), {"bad shape", "'w'", "negative"});
  expect_bad(st_bytes("{" + entry("w", "U8", "[1.0]", 0, 1) + "}", "a"), {"bad shape", "'w'", "floating"});
  expect_bad(st_bytes("{" + entry("w", "U8", "[281474976710656,0]", 0, 0) + "}"), {"bad shape", "'w'", "2^48"});
  expect_bad(st_bytes("{" + entry("w", "U8", "\"1\"", 0, 1) + "}", "a"), {"bad shape", "'w'"});
}

TEST(SafetensorsBad, BadDataOffsets) {
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "a"),
             {"bad data_offsets", "'w'", "3 values"});
  expect_bad(st_bytes("{" + entry("w", "U8", "[0]", 4, 2) + "}"), {"bad data_offsets", "'w'", "before begin"});
  expect_bad(st_bytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "a"),
             {"bad data_offsets", "'w'"});
}

TEST(SafetensorsBad, ShapeOverflow) {
  // 2^40 · 2^40 overflows the element count; 2^47 · 2^15 = 2^62 elements overflow the 64-bit size.
  expect_bad(st_bytes("{" + entry("w", "F32", "[1099511627776,1099511627776]", 0, 0) + "}"),
             {"shape overflow", "'w'"});
  expect_bad(st_bytes("{" + entry("w", "F64", "[140737488355328,32768]", 0, 0) + "}"), {"shape overflow", "'w'"});
  // A zero later in the shape does not excuse an overflowing prefix (as in the reference).
  expect_bad(st_bytes("{" + entry("w", "U8", "[1099511627776,1099511627776,0]", 0, 0) + "}"),
             {"shape overflow", "'w'"});
}

TEST(SafetensorsBad, SubByteSize) {
  expect_bad(st_bytes("{" + entry("w", "F4", "[3]", 0, 2) + "}", "ab"), {"sub-byte size", "'w'"});
}

TEST(SafetensorsBad, ByteSizeMismatch) {
  expect_bad(st_bytes("{" + entry("w", "F32", "[2]", 0, 4) + "}", "abcd"), {"byte size mismatch", "'w'", "needs 8"});
}

TEST(SafetensorsBad, OffsetsNotContiguous) {
  // A hole between two tensors.
  expect_bad(st_bytes("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}",
                      std::string(12, 'x')),
             {"offsets not contiguous", "'b'", "hole"});
  // Two tensors over one region (the reference's memory-blowup attack).
  expect_bad(st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}",
                      std::string(12, 'x')),
             {"offsets not contiguous", "'b'", "overlap"});
  expect_bad(st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 0, 8) + "}",
                      std::string(8, 'x')),
             {"offsets not contiguous", "overlap"});
  // The first tensor does not start at 0.
  expect_bad(st_bytes("{" + entry("a", "F32", "[1]", 4, 8) + "}", std::string(8, 'x')),
             {"offsets not contiguous", "'a'", "expected 0"});
}

TEST(SafetensorsBad, DataSectionTooShort) {
  expect_bad(st_bytes("{" + entry("w", "F32", "[2]", 0, 8) + "}", "abcd"), {"data section too short", "8", "4"});
}

TEST(SafetensorsBad, TrailingBytes) {
  expect_bad(st_bytes("{" + entry("w", "U8", "[2]", 0, 2) + "}", "ab" + std::string("polyglot")),
             {"trailing bytes", "8 bytes"});
}

TEST(SafetensorsBad, EveryTruncationOfAGoodFileIsRejected) {
  std::string good = serialize_safetensors({{"a", patterned(DType::F32, {2, 3}, 1)},
                                            {"b", patterned(DType::BF16, {5}, 2)}},
                                           {{"format", "pt"}});
  for (size_t n = 0; n < good.size(); ++n) {
    try {
      SafetensorsFile::from_bytes(good.substr(0, n), "cut");
      ADD_FAILURE() << "accepted a file cut to " << n << " bytes";
    } catch (const InputError&) {
    }
  }
}

}  // namespace
}  // namespace dsv3
