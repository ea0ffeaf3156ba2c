#include "net/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace dsv3::net {

std::string Table::text() const {
  std::vector<size_t> w(headers.size(), 0);
  for (size_t i = 0; i < headers.size(); ++i) w[i] = headers[i].size();
  for (auto& r : rows)
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  std::ostringstream s;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t i = 0; i < w.size(); ++i) {
      std::string v = i < r.size() ? r[i] : "";
      s << (i ? "  " : "") << std::string(w[i] - v.size(), ' ') << v;
    }
    s << "\n";
  };
  line(headers);
  size_t tot = 0;
  for (auto x : w) tot += x + 2;
  s << std::string(tot - 2, '-') << "\n";
  for (auto& r : rows) line(r);
  return s.str();
}

std::string Table::csv() const {
  std::ostringstream s;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t i = 0; i < r.size(); ++i) {
      std::string v = r[i];
      v.erase(std::remove(v.begin(), v.end(), ','), v.end());
      s << (i ? "," : "") << v;
    }
    s << "\n";
  };
  line(headers);
  for (auto& r : rows) line(r);
  return s.str();
}

std::string fmt(double v, int d) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (std::isnan(v)) return "nan";
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", d, v);
  return b;
}

std::string fmt_int(long long v) {
  std::string s = std::to_string(v < 0 ? -v : v), o;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) o += ',';
    o += s[i];
  }
  return v < 0 ? "-" + o : o;
}

namespace {

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else o += c;
  }
  return o;
}

std::vector<double> nice_ticks(double lo, double hi, int want) {
  double span = hi - lo;
  if (span <= 0) span = std::fabs(hi) + 1;
  double step = std::pow(10.0, std::floor(std::log10(span / want)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (span / (step * m) <= want) {
      step *= m;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) t.push_back(std::fabs(v) < step * 1e-9 ? 0 : v);
  return t;
}

std::string num(double v) {
  char b[32];
  if (v >= 1024 && std::fmod(v, 1024) == 0) {
    std::snprintf(b, sizeof b, "%gK", v / 1024);
    return b;
  }
  if (std::fabs(v) >= 1e4 || (std::fabs(v) < 1e-2 && v != 0)) std::snprintf(b, sizeof b, "%.3g", v);
  else std::snprintf(b, sizeof b, "%g", v);
  return b;
}

}  // namespace

std::string render_svg(const Chart& c) {
  const double W = 760, H = 460, L = 80, R = 200, T = 40, B = 60;
  const double pw = W - L - R, ph = H - T - B;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  auto tx = [&](double x) { return c.logx ? std::log2(x) : x; };
  auto ty = [&](double y) { return c.logy ? std::log10(y) : y; };
  for (auto& s : c.series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (c.logy && s.y[i] <= 0)) continue;
      x0 = std::min(x0, tx(s.x[i])), x1 = std::max(x1, tx(s.x[i]));
      y0 = std::min(y0, ty(s.y[i])), y1 = std::max(y1, ty(s.y[i]));
    }
  if (!c.xcats.empty()) x0 = -0.5, x1 = (double)c.xcats.size() - 0.5;
  if (x0 > x1) x0 = 0, x1 = 1;
  if (y0 > y1) y0 = 0, y1 = 1;
  if (!c.logy) y0 = std::min(y0, 0.0);
  if (c.ymin != Chart::NAN_DEFAULT) y0 = ty(c.ymin);
  if (c.ymax != Chart::NAN_DEFAULT) y1 = ty(c.ymax);
  if (x1 == x0) x0 -= 0.5, x1 += 0.5;
  if (y1 == y0) y1 = y0 + 1;
  y1 += (y1 - y0) * 0.05;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return T + ph - (y - y0) / (y1 - y0) * ph; };
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << "<text x=\"" << L + pw / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" << esc(c.title) << "</text>\n";
  // Grid and ticks.
  std::vector<double> yt = c.logy ? std::vector<double>{} : nice_ticks(y0, y1, 6);
  if (c.logy)
    for (double e = std::ceil(y0); e <= y1; e += 1) yt.push_back(e);
  for (double v : yt) {
    s << "<line x1=\"" << L << "\" x2=\"" << L + pw << "\" y1=\"" << py(v) << "\" y2=\"" << py(v)
      << "\" stroke=\"#ddd\"/>\n<text x=\"" << L - 6 << "\" y=\"" << py(v) + 4 << "\" text-anchor=\"end\">"
      << num(c.logy ? std::pow(10.0, v) : v) << "</text>\n";
  }
  std::vector<std::pair<double, std::string>> xt;
  if (!c.xcats.empty())
    for (size_t i = 0; i < c.xcats.size(); ++i) xt.push_back({(double)i, c.xcats[i]});
  else if (c.logx)
    for (double e = std::ceil(x0); e <= x1 + 1e-9; e += 1) xt.push_back({e, num(std::pow(2.0, e))});
  else
    for (double v : nice_ticks(x0, x1, 8)) xt.push_back({v, num(v)});
  for (auto& [v, lab] : xt)
    s << "<line x1=\"" << px(v) << "\" x2=\"" << px(v) << "\" y1=\"" << T << "\" y2=\"" << T + ph
      << "\" stroke=\"#eee\"/>\n<text x=\"" << px(v) << "\" y=\"" << T + ph + 16 << "\" text-anchor=\"middle\">"
      << esc(lab) << "</text>\n";
  s << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"none\" stroke=\"black\"/>\n";
  s << "<text x=\"" << L + pw / 2 << "\" y=\"" << H - 18 << "\" text-anchor=\"middle\">" << esc(c.xlabel) << "</text>\n";
  s << "<text transform=\"translate(18," << T + ph / 2 << ") rotate(-90)\" text-anchor=\"middle\">" << esc(c.ylabel)
    << "</text>\n";
  for (size_t si = 0; si < c.series.size(); ++si) {
    const Series& se = c.series[si];
    std::string col = kPalette[(se.color >= 0 ? se.color : (int)si) % 8];
    std::ostringstream pts;
    for (size_t i = 0; i < se.x.size(); ++i) {
      if (!std::isfinite(se.y[i]) || (c.logy && se.y[i] <= 0)) continue;
      double X = px(tx(se.x[i])), Y = py(ty(se.y[i]));
      pts << X << "," << Y << " ";
      s << "<circle cx=\"" << X << "\" cy=\"" << Y << "\" r=\"3\" fill=\"" << col << "\"/>\n";
    }
    s << "<polyline fill=\"none\" stroke=\"" << col << "\" stroke-width=\"2\""
      << (se.dashed ? " stroke-dasharray=\"6,4\"" : "") << " points=\"" << pts.str() << "\"/>\n";
    double ly = T + 10 + 18 * (double)si;
    s << "<line x1=\"" << L + pw + 12 << "\" x2=\"" << L + pw + 40 << "\" y1=\"" << ly << "\" y2=\"" << ly
      << "\" stroke=\"" << col << "\" stroke-width=\"2\"" << (se.dashed ? " stroke-dasharray=\"6,4\"" : "")
      << "/>\n<text x=\"" << L + pw + 46 << "\" y=\"" << ly + 4 << "\">" << esc(se.name) << "</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

void write_file(const std::string& path, const std::string& content) {
  namespace fs = std::filesystem;
  fs::path p(path);
  if (p.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(p.parent_path(), ec);
  }
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) input_error("output ", path, ": cannot write");
    f << content;
    if (!f) input_error("output ", path, ": write failed");
  }
  fs::rename(tmp, path);
}

}  // namespace dsv3::net
