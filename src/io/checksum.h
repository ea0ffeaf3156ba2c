// CRC-32 (IEEE 802.3, the polynomial of zlib, gzip and PNG; reflected, init and final xor
// 0xFFFFFFFF), so a file's checksum can be checked with any standard tool (python zlib.crc32).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv3 {

// Continue a running CRC: crc32_update(crc32_update(0, a), b) == crc32 of a followed by b.
uint32_t crc32_update(uint32_t crc, const void* data, size_t n);
inline uint32_t crc32(const void* data, size_t n) { return crc32_update(0, data, n); }

// CRC-32 and size of a whole file, read in blocks. Throws InputError if it cannot be read.
struct FileDigest {
  uint64_t size = 0;
  uint32_t crc = 0;
};
FileDigest digest_file(const std::string& path);
std::string crc_hex(uint32_t crc);  // 8 lower-case hex digits

}  // namespace dsv3
