// Output: aligned text tables, CSV, and a small SVG line-chart writer (no external plotting tool).
#pragma once
#include <string>
#include <vector>

namespace dsv3::net {

struct Table {
  std::vector<std::string> headers;
  std::vector<std::vector<std::string>> rows;
  void add(std::vector<std::string> r) { rows.push_back(std::move(r)); }
  std::string text() const;  // right-aligned columns
  std::string csv() const;
};

std::string fmt(double v, int decimals);
std::string fmt_int(long long v);  // thousands separators

struct Series {
  Series() = default;
  explicit Series(std::string n) : name(std::move(n)) {}
  std::string name;
  std::vector<double> x, y;
  bool dashed = false;
  int color = -1;  // palette index; -1 = by position
};

struct Chart {
  std::string title, xlabel, ylabel;
  bool logx = false, logy = false;
  std::vector<std::string> xcats;  // categorical x axis: x values are indices into this
  std::vector<Series> series;
  double ymin = NAN_DEFAULT, ymax = NAN_DEFAULT;
  static constexpr double NAN_DEFAULT = -1e300;
};

std::string render_svg(const Chart& c);

// Writes through a temporary file and a rename, so a failed run never leaves half a file.
void write_file(const std::string& path, const std::string& content);

}  // namespace dsv3::net
