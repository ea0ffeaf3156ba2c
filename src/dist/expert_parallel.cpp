// Expert-parallel dispatch/combine for one MoE layer (see expert_parallel.h). Packing and the
// bookkeeping of rows run on the host; the expert math goes through the same backend ops as
// moe_forward/moe_backward, in the same row order, which is what makes the equalities bitwise.
#include "dist/expert_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <tuple>

#include "backend/fp8.h"
#include "model/moe_hook.h"
#include "model/module_ops.h"

namespace dsv3 {

namespace {

// One wire row: [int32 src][int32 token][int32 expert[K]][float value[K]][payload].
struct Layout {
  int64_t K = 0, payload = 0;
  int64_t bytes() const { return 8 + 8 * K + payload; }
};

struct Outbox {
  explicit Outbox(int P) : buf(static_cast<size_t>(P)), rows(size_t(P), 0) {}
  std::vector<std::vector<char>> buf;
  std::vector<int64_t> rows;
  char* add(int dest, const Layout& l) {
    auto& b = buf[size_t(dest)];
    b.resize(b.size() + size_t(l.bytes()));
    ++rows[size_t(dest)];
    return b.data() + b.size() - size_t(l.bytes());
  }
};

void put_meta(char* row, const Layout& l, int32_t src, int32_t token, std::span<const int32_t> ex,
              std::span<const float> val) {
  std::memcpy(row, &src, 4);
  std::memcpy(row + 4, &token, 4);
  for (int64_t j = 0; j < l.K; ++j) {
    const int32_t e = j < int64_t(ex.size()) ? ex[size_t(j)] : -1;
    const float v = j < int64_t(val.size()) ? val[size_t(j)] : 0.0f;
    std::memcpy(row + 8 + 4 * j, &e, 4);
    std::memcpy(row + 8 + 4 * l.K + 4 * j, &v, 4);
  }
}

EpRow get_meta(const char* row, const Layout& l) {
  EpRow r;
  std::memcpy(&r.src, row, 4);
  std::memcpy(&r.token, row + 4, 4);
  for (int64_t j = 0; j < l.K; ++j) {
    int32_t e;
    float v;
    std::memcpy(&e, row + 8 + 4 * j, 4);
    std::memcpy(&v, row + 8 + 4 * l.K + 4 * j, 4);
    if (e < 0) break;
    r.experts.push_back(e);
    r.weights.push_back(v);
  }
  return r;
}

// The bytes sb[j] sent to every other rank j, into `bytes` and the intra-/inter-node stats.
void count_sent(const Communicator& c, const std::vector<int64_t>& sb, int64_t& bytes, EpStats& st) {
  for (int j = 0; j < c.size(); ++j) {
    if (j == c.rank()) continue;
    bytes += sb[size_t(j)];
    (c.node_of(j) == c.node() ? st.intra_node_bytes : st.inter_node_bytes) += sb[size_t(j)];
  }
}

// Sends every outbox buffer to its rank; returns the received bytes (sender order) and the row
// count from each sender. Counts the bytes sent to other ranks into `bytes` and the stats.
std::vector<char> exchange(Communicator& c, const Outbox& out, const Layout& l, std::vector<int64_t>& rows_from,
                           int64_t& bytes, EpStats& st) {
  const int P = c.size();
  const std::vector<int64_t> recv_rows = c.exchange_counts(out.rows);
  std::vector<int64_t> sb(static_cast<size_t>(P)), rb(static_cast<size_t>(P));
  std::vector<char> send;
  for (int j = 0; j < P; ++j) {
    sb[size_t(j)] = out.rows[size_t(j)] * l.bytes();
    rb[size_t(j)] = recv_rows[size_t(j)] * l.bytes();
    send.insert(send.end(), out.buf[size_t(j)].begin(), out.buf[size_t(j)].end());
  }
  count_sent(c, sb, bytes, st);
  std::vector<char> recv(size_t(std::accumulate(rb.begin(), rb.end(), int64_t(0))));
  c.all_to_all_v(send.data(), sb, recv.data(), rb);
  rows_from = recv_rows;
  return recv;
}

Tensor host_f32(Backend& be, const Tensor& t) { return be.to_host(t); }

// Picks [b, e) of the plan's flat pick arrays.
template <class T>
std::span<const T> pick_span(const std::vector<T>& v, int64_t b, int64_t e) {
  return std::span<const T>(v).subspan(size_t(b), size_t(e - b));
}

}  // namespace

ExpertParallelMoe::ExpertParallelMoe(Communicator& ep, const ModelDims& d, EpOptions o) : c_(ep), d_(d), o_(o) {
  const int P = ep.size();
  if (d.n_experts % P != 0)
    input_error("expert parallelism: n_routed_experts ", d.n_experts, " is not a multiple of the EP size ", P);
  epr_ = d.n_experts / P;
  if (o.node_limit < 0 || o.node_limit > ep.nodes())
    input_error("--node-limit ", o.node_limit, ": expected 0 (off) .. the number of nodes ", ep.nodes());
  if (o.node_limit > 0 && d.top_k % o.node_limit != 0)
    input_error("--node-limit ", o.node_limit, ": must divide num_experts_per_tok ", d.top_k);
}

void ExpertParallelMoe::route(Backend& be, const MoeParams& p, const Tensor& x, MoeActs& a) {
  const int64_t N = x.dim(0), k = d_.top_k;
  moe_gate_and_route(be, d_, p, x, a);
  if (o_.node_limit > 0) {
    Tensor ids = Tensor::empty(DType::I32, {N, k}), w = Tensor::empty(DType::F32, {N, k});
    Tensor bias = present(p.e_score_correction_bias) ? be.to_host(p.e_score_correction_bias) : Tensor();
    node_limited_topk(be.to_host(a.scores), bias, c_.nodes(), o_.node_limit, int(k), d_.norm_topk_prob,
                      d_.routed_scaling_factor, ids, w);
    a.ids = be.to_device(ids);
    a.weights = be.to_device(w);
  }
  moe_group_picks(be, d_, a);  // counts = this rank's loads
}

void ExpertParallelMoe::token_groups(const int32_t* id, const float* wt, std::vector<Group>& out) const {
  const int64_t K = d_.top_k;
  const int rpn = c_.ranks_per_node();
  auto dest_of = [&](int32_t e) { return o_.two_hop ? c_.node_of(owner(e)) * rpn + c_.local_rank() : owner(e); };
  std::vector<std::tuple<int32_t, float, int32_t>> picks;
  for (int64_t j = 0; j < K; ++j) {
    if (id[j] < 0 || id[j] >= d_.n_experts)
      internal_error("expert-parallel routing: expert id ", id[j], " outside [0, ", d_.n_experts, ")");
    picks.push_back({id[j], wt[j], int32_t(j)});
  }
  std::sort(picks.begin(), picks.end(), [](auto& a, auto& b) { return std::get<0>(a) < std::get<0>(b); });
  out.clear();
  for (size_t i = 0; i < picks.size(); ++i) {
    const auto [e, w, j] = picks[i];
    // A pick's gate-weight gradient returns to its slot j: two picks of one expert would share it.
    if (i > 0 && std::get<0>(picks[i - 1]) == e) internal_error("expert-parallel routing: expert ", e, " picked twice");
    if (out.empty() || out.back().dest != dest_of(e)) out.push_back({dest_of(e), {}, {}, {}});
    out.back().experts.push_back(e);
    out.back().weights.push_back(w);
    out.back().slots.push_back(j);
  }
}

void ExpertParallelMoe::make_plan(Backend& be, const MoeActs& a, EpPlan& plan) {
  const int P = c_.size();
  const int64_t N = a.ids.dim(0), K = d_.top_k;
  plan = EpPlan{};
  plan.ids = be.to_host(a.ids);
  plan.weights = be.to_host(a.weights);
  ++stats_.plans;
  std::vector<std::vector<std::pair<int32_t, Group>>> to(static_cast<size_t>(P));
  std::vector<Group> groups;
  for (int64_t t = 0; t < N; ++t) {
    token_groups(plan.ids.data<int32_t>() + t * K, plan.weights.data<float>() + t * K, groups);
    for (Group& g : groups) to[size_t(g.dest)].push_back({int32_t(t), std::move(g)});
  }
  plan.send_rows.assign(size_t(P), 0);
  plan.pick_begin.assign(1, 0);
  for (int j = 0; j < P; ++j) {
    for (const auto& [t, g] : to[size_t(j)]) {
      plan.send_tok.push_back(t);
      for (size_t i = 0; i < g.experts.size(); ++i) {
        plan.pick_expert.push_back(g.experts[i]);
        plan.pick_weight.push_back(g.weights[i]);
        plan.pick_slot.push_back(t * K + g.slots[i]);
      }
      plan.pick_begin.push_back(int64_t(plan.pick_expert.size()));
    }
    plan.send_rows[size_t(j)] = int64_t(to[size_t(j)].size());
  }
  // The combine (always F32) takes the direct path whenever the dispatch could.
  if (direct_path(be, false) && !plan.send_tok.empty()) plan.send_tok_t = modops::i32_tensor(be, plan.send_tok);
}

bool ExpertParallelMoe::direct_path(const Backend& be, bool fp8) const {
  return (be.device() == Device::CPU || c_.device_buffers()) && !o_.two_hop && !fp8 && !o_.host_rows;
}

// Single hop, F32: the metadata rows go through host memory as in the row path, while the hidden
// states are gathered into destination order by the backend and sent from its memory (GPU to GPU
// under NCCL). Rows arrive by source rank and, within one, by token: already (src, token) order.
Tensor ExpertParallelMoe::dispatch_direct(Backend& be, EpPlan& plan, const Tensor& payload, std::vector<EpRow>& rows,
                                          int64_t& bytes) {
  const int P = c_.size(), me = c_.rank();
  const Layout meta{d_.top_k, 0};
  Outbox out(P);
  for (int j = 0, i = 0; j < P; ++j)
    for (int64_t n = 0; n < plan.send_rows[size_t(j)]; ++n, ++i) {
      const int64_t b = plan.pick_begin[size_t(i)], e = plan.pick_begin[size_t(i) + 1];
      put_meta(out.add(j, meta), meta, me, plan.send_tok[size_t(i)], pick_span(plan.pick_expert, b, e),
               pick_span(plan.pick_weight, b, e));
    }
  const std::vector<char> got = exchange(c_, out, meta, plan.recv_rows, bytes, stats_);
  const int64_t R = int64_t(got.size()) / meta.bytes();
  rows.clear();
  for (int64_t r = 0; r < R; ++r) rows.push_back(get_meta(got.data() + r * meta.bytes(), meta));
  return send_direct(be, plan, payload, bytes);
}

// The hidden states (or dout) of the plan's rows, one block per rank, with the counts the forward
// exchanged: no metadata and no count exchange.
Tensor ExpertParallelMoe::send_direct(Backend& be, const EpPlan& plan, const Tensor& payload, int64_t& bytes) {
  const int P = c_.size();
  const int64_t H = d_.H, S = int64_t(plan.send_tok.size());
  const int64_t R = std::accumulate(plan.recv_rows.begin(), plan.recv_rows.end(), int64_t(0));
  Tensor send = be.alloc(DType::F32, {std::max<int64_t>(S, 1), H}).rows(0, S);
  if (S > 0) modops::gather_rows(be, payload, plan.send_tok_t, send);
  Tensor xin = be.alloc(DType::F32, {std::max<int64_t>(R, 1), H}).rows(0, R);
  std::vector<int64_t> sb(static_cast<size_t>(P)), rb(static_cast<size_t>(P));
  for (int j = 0; j < P; ++j) {
    sb[size_t(j)] = plan.send_rows[size_t(j)] * H * 4;
    rb[size_t(j)] = plan.recv_rows[size_t(j)] * H * 4;
  }
  count_sent(c_, sb, bytes, stats_);
  c_.all_to_all_v(send.raw(), sb, xin.raw(), rb);
  return xin;
}

// The reverse of dispatch_direct: the partial sums leave in row order (one contiguous block per
// source); a source gets back from rank j the tokens it sent j, in the order it sent them, which is
// the plan's send order. The backward's gate-weight gradients follow as bare floats, one per pick,
// in the same order: the source knows each pick's slot from the plan.
void ExpertParallelMoe::combine_direct(Backend& be, const EpPlan& plan, const std::vector<EpRow>& rows,
                                       const Tensor& partial, const std::vector<std::vector<float>>* row_vals,
                                       Tensor& out, std::vector<float>* vals, int64_t& bytes) {
  const int P = c_.size();
  const int64_t H = d_.H;
  if (vals && !row_vals) internal_error("combine_direct: per-row values are needed for the per-pick ones");
  std::vector<int64_t> sb(static_cast<size_t>(P), 0), rb(static_cast<size_t>(P), 0);
  std::vector<int64_t> held(static_cast<size_t>(P), 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    // The partial sums leave as one block per source: the rows must be grouped by source, ascending.
    if (rows[r].src < 0 || rows[r].src >= P || (r > 0 && rows[r].src < rows[r - 1].src))
      internal_error("combine_direct: row ", r, " from rank ", rows[r].src, " is out of source order");
    ++held[size_t(rows[r].src)];
  }
  if (held != plan.recv_rows) internal_error("combine_direct: the rows held differ from the rows the forward received");
  for (int j = 0; j < P; ++j) {
    sb[size_t(j)] = plan.recv_rows[size_t(j)] * H * 4;
    rb[size_t(j)] = plan.send_rows[size_t(j)] * H * 4;
  }
  count_sent(c_, sb, bytes, stats_);
  const int64_t S = int64_t(plan.send_tok.size());
  Tensor back = be.alloc(DType::F32, {std::max<int64_t>(S, 1), H}).rows(0, S);
  c_.all_to_all_v(partial.raw(), sb, back.raw(), rb);
  if (vals) {
    std::vector<float> send;
    std::fill(sb.begin(), sb.end(), 0);
    std::fill(rb.begin(), rb.end(), 0);
    for (size_t r = 0; r < rows.size(); ++r) {
      const std::vector<float>& v = (*row_vals)[r];
      if (v.size() != rows[r].experts.size()) internal_error("combine_direct: row ", r, " has ", v.size(), " values");
      send.insert(send.end(), v.begin(), v.end());
      sb[size_t(rows[r].src)] += int64_t(v.size()) * 4;
    }
    for (int j = 0, i = 0; j < P; ++j)
      for (int64_t n = 0; n < plan.send_rows[size_t(j)]; ++n, ++i)
        rb[size_t(j)] += (plan.pick_begin[size_t(i) + 1] - plan.pick_begin[size_t(i)]) * 4;
    std::vector<float> got(plan.pick_slot.size());
    count_sent(c_, sb, bytes, stats_);
    c_.all_to_all_v(send.data(), sb, got.data(), rb);
    for (size_t q = 0; q < got.size(); ++q) (*vals)[size_t(plan.pick_slot[q])] = got[q];
  }
  if (S == 0) return;
  ScatterAddRowsArgs sc;
  sc.src = back;
  sc.idx = plan.send_tok_t;
  sc.out = out;
  be.scatter_add_rows(sc);
}

Tensor ExpertParallelMoe::dispatch_rows(Backend& be, const EpPlan& plan, const Tensor& payload, bool fp8,
                                        std::vector<EpRow>& rows, int64_t& bytes) {
  const int P = c_.size(), me = c_.rank();
  const int64_t N = payload.dim(0), H = d_.H, K = d_.top_k, nb = (H + 127) / 128;
  Layout l{K, fp8 ? H + 4 * nb : 4 * H};

  // Payload bytes per token.
  Tensor x = host_f32(be, payload), q, sc;
  if (fp8 && N > 0) {
    q = Tensor::empty(DType::F8_E4M3, {N, H});
    sc = Tensor::empty(DType::F32, {N, nb});
    QuantizeFp8Args qa;
    qa.x = x;
    qa.q = q;
    qa.scale = sc;
    qa.pow2_scale = true;  // the paper quantizes dispatch activations with power-of-two scales
    qa.name = "MoE dispatch payload";
    // A diverged activation must reach the experts as NaN, so that every rank's loss shows it and
    // the step is skipped: a throw here would leave the other ranks waiting in the exchange, and
    // E4M3 would saturate an Inf to a finite code. A tile with a non-finite value gets a NaN scale.
    qa.on_nonfinite = NonFinitePolicy::Report;
    if (quantize_fp8(qa).nonfinite > 0)
      for (int64_t t = 0; t < N; ++t)
        for (int64_t b = 0; b < nb; ++b) {
          const float* v = x.data<float>() + t * H + b * 128;
          if (!std::all_of(v, v + std::min<int64_t>(128, H - b * 128), [](float f) { return std::isfinite(f); }))
            sc.data<float>()[t * nb + b] = std::numeric_limits<float>::quiet_NaN();
        }
  }
  auto put_payload = [&](char* row, int64_t t) {
    char* dst = row + 8 + 8 * K;
    if (fp8) {
      std::memcpy(dst, static_cast<const char*>(q.raw()) + t * H, size_t(H));
      std::memcpy(dst + H, sc.data<float>() + t * nb, size_t(4 * nb));
    } else {
      std::memcpy(dst, x.data<float>() + t * H, size_t(4 * H));
    }
  };

  // Hop 1: one row per (token, destination rank) — or per destination node, to the same local rank.
  Outbox out(P);
  for (int j = 0, i = 0; j < P; ++j)
    for (int64_t n = 0; n < plan.send_rows[size_t(j)]; ++n, ++i) {
      const int64_t b = plan.pick_begin[size_t(i)], e = plan.pick_begin[size_t(i) + 1];
      char* row = out.add(j, l);
      put_meta(row, l, me, plan.send_tok[size_t(i)], pick_span(plan.pick_expert, b, e),
               pick_span(plan.pick_weight, b, e));
      put_payload(row, plan.send_tok[size_t(i)]);
    }
  std::vector<int64_t> from;
  std::vector<char> got = exchange(c_, out, l, from, bytes, stats_);
  int64_t R = int64_t(got.size()) / l.bytes();

  if (o_.two_hop) {
    // Hop 2: forward inside this node, split by the owning rank.
    Outbox fwd(P);
    for (int64_t r = 0; r < R; ++r) {
      const char* row = got.data() + r * l.bytes();
      EpRow m = get_meta(row, l);
      for (size_t i = 0; i < m.experts.size();) {
        const int dest = owner(m.experts[i]);
        std::vector<int32_t> ex;
        std::vector<float> wv;
        for (; i < m.experts.size() && owner(m.experts[i]) == dest; ++i) {
          ex.push_back(m.experts[i]);
          wv.push_back(m.weights[i]);
        }
        char* o = fwd.add(dest, l);
        put_meta(o, l, m.src, m.token, ex, wv);
        std::memcpy(o + 8 + 8 * K, row + 8 + 8 * K, size_t(l.payload));
      }
    }
    got = exchange(c_, fwd, l, from, bytes, stats_);
    R = int64_t(got.size()) / l.bytes();
  }

  // Arrived rows in (src, token) order, whatever path they took.
  rows.clear();
  for (int64_t r = 0; r < R; ++r) rows.push_back(get_meta(got.data() + r * l.bytes(), l));
  std::vector<int64_t> order(static_cast<size_t>(R));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return std::make_pair(rows[size_t(a)].src, rows[size_t(a)].token) < std::make_pair(rows[size_t(b)].src, rows[size_t(b)].token);
  });
  std::vector<EpRow> sorted;
  for (int64_t r : order) sorted.push_back(rows[size_t(r)]);
  rows = std::move(sorted);
  Tensor xin = Tensor::empty(DType::F32, {R, H});
  if (R > 0 && fp8) {
    Tensor rq = Tensor::empty(DType::F8_E4M3, {R, H}), rs = Tensor::empty(DType::F32, {R, nb});
    for (int64_t i = 0; i < R; ++i) {
      const char* src = got.data() + order[size_t(i)] * l.bytes() + 8 + 8 * K;
      std::memcpy(static_cast<char*>(rq.raw()) + i * H, src, size_t(H));
      std::memcpy(rs.data<float>() + i * nb, src + H, size_t(4 * nb));
    }
    dequantize_fp8(rq, rs, xin);
  } else {
    for (int64_t i = 0; i < R; ++i)
      std::memcpy(xin.data<float>() + i * H, got.data() + order[size_t(i)] * l.bytes() + 8 + 8 * K, size_t(4 * H));
  }
  return be.to_device(xin);
}

void ExpertParallelMoe::combine(Backend& be, const EpPlan& plan, const std::vector<EpRow>& rows,
                                const Tensor& partial_d, const std::vector<std::vector<float>>* row_vals, int64_t N,
                                Tensor& out, std::vector<float>* vals, int64_t& bytes) {
  if (direct_path(be, false)) return combine_direct(be, plan, rows, partial_d, row_vals, out, vals, bytes);
  const int P = c_.size(), rpn = c_.ranks_per_node();
  const int64_t H = d_.H, K = d_.top_k, R = int64_t(rows.size());
  const Layout l{K, 4 * H};
  const Tensor partial = R > 0 ? be.to_host(partial_d) : Tensor();
  Outbox box(P);
  for (int64_t r = 0; r < R; ++r) {
    const EpRow& m = rows[size_t(r)];
    const int dest = o_.two_hop ? c_.node() * rpn + c_.local_rank_of(m.src) : m.src;
    char* row = box.add(dest, l);
    put_meta(row, l, m.src, m.token, m.experts, row_vals ? (*row_vals)[size_t(r)] : std::vector<float>{});
    std::memcpy(row + 8 + 8 * K, partial.data<float>() + r * H, size_t(4 * H));
  }
  std::vector<int64_t> from;
  std::vector<char> got = exchange(c_, box, l, from, bytes, stats_);
  if (o_.two_hop) {
    // Middle rank: add this node's partial sums of each (src, token) in sender order, then return
    // one row per token to its source.
    const int64_t Rg = int64_t(got.size()) / l.bytes();
    std::vector<int64_t> order(static_cast<size_t>(Rg));
    std::iota(order.begin(), order.end(), 0);
    std::vector<EpRow> meta;
    for (int64_t r = 0; r < Rg; ++r) meta.push_back(get_meta(got.data() + r * l.bytes(), l));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return std::make_pair(meta[size_t(a)].src, meta[size_t(a)].token) < std::make_pair(meta[size_t(b)].src, meta[size_t(b)].token);
    });
    Outbox back(P);
    for (size_t i = 0; i < order.size();) {
      const EpRow& first = meta[size_t(order[i])];
      EpRow merged;
      merged.src = first.src;
      merged.token = first.token;
      std::vector<float> sum(size_t(H), 0.0f);
      for (; i < order.size() && meta[size_t(order[i])].src == first.src && meta[size_t(order[i])].token == first.token; ++i) {
        const EpRow& m = meta[size_t(order[i])];
        merged.experts.insert(merged.experts.end(), m.experts.begin(), m.experts.end());
        merged.weights.insert(merged.weights.end(), m.weights.begin(), m.weights.end());
        const char* p = got.data() + order[i] * l.bytes() + 8 + 8 * K;
        for (int64_t h = 0; h < H; ++h) {
          float v;
          std::memcpy(&v, p + 4 * h, 4);
          sum[size_t(h)] += v;
        }
      }
      char* row = back.add(merged.src, l);
      put_meta(row, l, merged.src, merged.token, merged.experts, merged.weights);
      std::memcpy(row + 8 + 8 * K, sum.data(), size_t(4 * H));
    }
    got = exchange(c_, back, l, from, bytes, stats_);
  }
  // Source: add the arrived partial sums in sender (= expert block) order.
  const int64_t Rs = int64_t(got.size()) / l.bytes();
  if (Rs == 0) return;
  Tensor src = Tensor::empty(DType::F32, {Rs, H});
  std::vector<int32_t> tok(static_cast<size_t>(Rs));
  const Tensor& ids = plan.ids;
  for (int64_t r = 0; r < Rs; ++r) {
    const char* row = got.data() + r * l.bytes();
    const EpRow m = get_meta(row, l);
    if (m.token < 0 || m.token >= N) throw CommError(cat("MoE combine: token ", m.token, " outside [0, ", N, ")"));
    tok[size_t(r)] = m.token;
    std::memcpy(src.data<float>() + r * H, row + 8 + 8 * K, size_t(4 * H));
    if (!vals) continue;
    for (size_t i = 0; i < m.experts.size(); ++i)
      for (int64_t j = 0; j < K; ++j)
        if (ids.data<int32_t>()[m.token * K + j] == m.experts[i]) (*vals)[size_t(m.token * K + j)] = m.weights[i];
  }
  ScatterAddRowsArgs sc;
  sc.src = be.to_device(src);
  sc.idx = modops::i32_tensor(be, tok);
  sc.out = out;
  be.scatter_add_rows(sc);
}

void ExpertParallelMoe::forward(Backend& be, const MoeParams& p, const Tensor& x, EpMoeActs& a) {
  const int64_t N = x.dim(0), H = d_.H, e0 = first_expert();
  route(be, p, x, a.local);
  make_plan(be, a.local, a.plan);
  int64_t bytes = 0;
  if (direct_path(be, o_.fp8_dispatch)) {
    a.xin = dispatch_direct(be, a.plan, x, a.rows, bytes);
  } else {
    a.xin = dispatch_rows(be, a.plan, x, o_.fp8_dispatch, a.rows, bytes);
    a.plan.recv_rows.assign(size_t(c_.size()), 0);
    for (const EpRow& m : a.rows) {
      if (m.src < 0 || m.src >= c_.size()) throw CommError(cat("MoE dispatch: a row from rank ", m.src));
      ++a.plan.recv_rows[size_t(m.src)];
    }
  }
  stats_.dispatch_bytes += bytes;
  const int64_t R = int64_t(a.rows.size());
  stats_.dispatch_rows += R;

  // Picks grouped by local expert, rows in (src, token) order within each: the single-process order.
  a.pick_row.clear();
  a.pick_w.clear();
  a.offsets.assign(size_t(epr_ + 1), 0);
  for (int64_t el = 0; el < epr_; ++el) {
    for (int64_t r = 0; r < R; ++r) {
      const EpRow& m = a.rows[size_t(r)];
      for (size_t j = 0; j < m.experts.size(); ++j)
        if (m.experts[j] == e0 + el) {
          a.pick_row.push_back(int32_t(r));
          a.pick_w.push_back(m.weights[j]);
        }
    }
    a.offsets[size_t(el + 1)] = int64_t(a.pick_row.size());
  }
  const int64_t Rp = int64_t(a.pick_row.size());
  Tensor partial = be.zeros(DType::F32, {std::max<int64_t>(R, 1), H}).rows(0, R);
  if (Rp > 0) {
    a.pick_row_t = modops::i32_tensor(be, a.pick_row);
    Tensor pw = Tensor::empty(DType::F32, {Rp});
    std::copy(a.pick_w.begin(), a.pick_w.end(), pw.data<float>());
    a.pick_w_t = be.to_device(pw);
    MlpActs& m = a.routed;
    m.x = be.alloc(DType::F32, {Rp, H});
    modops::gather_rows(be, a.xin, a.pick_row_t, m.x);  // [Rp, H]
    experts_forward(be, std::span(p.experts).subspan(size_t(e0), size_t(epr_)), a.offsets, m.x, m);
    ScatterAddRowsArgs sc;  // per arrived row: Σ over its experts (ascending) of w·y
    sc.src = m.out;
    sc.idx = a.pick_row_t;
    sc.weight = a.pick_w_t;
    sc.out = partial;
    be.scatter_add_rows(sc);
  }
  Tensor routed = be.zeros(DType::F32, {N, H});
  bytes = 0;
  combine(be, a.plan, a.rows, partial, nullptr, N, routed, nullptr, bytes);
  stats_.combine_bytes += bytes;
  stats_.combine_rows += R;
  if (p.has_shared) {
    mlp_forward(be, p.shared_experts, x, a.local.shared);
    a.local.out = modops::add(be, routed, a.local.shared.out);
  } else {
    a.local.out = routed;
  }
}

void ExpertParallelMoe::backward(Backend& be, const MoeParams& p, const MoeParams& g, const EpMoeActs& a,
                                 const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx,
                                 bool accumulate_dx) {
  const int64_t N = a.local.x.dim(0), K = d_.top_k, H = d_.H, e0 = first_expert();
  if (!accumulate_dx) {
    FillArgs f;
    f.x = dx;
    be.fill(f);
  }
  if (p.has_shared) mlp_backward(be, p.shared_experts, g.shared_experts, a.local.shared, dout, dx, true);

  // dout travels the dispatch path (always F32) to the forward's rows: on the direct path alone,
  // with the forward's counts; on the row path inside rows again.
  int64_t bytes = 0;
  Tensor dout_in;
  if (direct_path(be, false)) {
    dout_in = send_direct(be, a.plan, dout, bytes);
  } else {
    std::vector<EpRow> rows;
    dout_in = dispatch_rows(be, a.plan, dout, false, rows, bytes);
    if (rows.size() != a.rows.size()) internal_error("EP backward: ", rows.size(), " rows arrived, forward had ", a.rows.size());
  }
  const int64_t R = int64_t(a.rows.size()), Rp = int64_t(a.pick_row.size());
  Tensor partial = be.zeros(DType::F32, {std::max<int64_t>(R, 1), H}).rows(0, R);
  std::vector<std::vector<float>> row_vals(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) row_vals[size_t(r)].assign(a.rows[size_t(r)].experts.size(), 0.0f);
  if (Rp > 0) {
    const MlpActs& m = a.routed;
    Tensor dm_out = be.alloc(DType::F32, {Rp, H});
    Tensor dpw = be.alloc(DType::F32, {Rp});
    ScatterAddRowsBackwardArgs sb;
    sb.dout = dout_in;
    sb.src = m.out;
    sb.idx = a.pick_row_t;
    sb.weight = a.pick_w_t;
    sb.dsrc = dm_out;
    sb.dweight = dpw;
    be.scatter_add_rows_backward(sb);
    Tensor dm_x = be.alloc(DType::F32, {Rp, H});
    experts_backward(be, std::span(p.experts).subspan(size_t(e0), size_t(epr_)),
                     std::span(g.experts).subspan(size_t(e0), size_t(epr_)), a.offsets, m, dm_out, dm_x, false);
    ScatterAddRowsArgs sx;
    sx.src = dm_x;
    sx.idx = a.pick_row_t;
    sx.out = partial;
    be.scatter_add_rows(sx);
    const Tensor dw = be.to_host(dpw);
    for (int64_t q = 0; q < Rp; ++q) {
      const int64_t el = std::upper_bound(a.offsets.begin(), a.offsets.end(), q) - a.offsets.begin() - 1;
      const EpRow& m2 = a.rows[size_t(a.pick_row[size_t(q)])];
      for (size_t j = 0; j < m2.experts.size(); ++j)
        if (m2.experts[j] == e0 + el) row_vals[size_t(a.pick_row[size_t(q)])][j] = dw.data<float>()[q];
    }
  }
  std::vector<float> dweights(size_t(N * K), 0.0f);
  Tensor dx_acc = dx;
  combine(be, a.plan, a.rows, partial, &row_vals, N, dx_acc, &dweights, bytes);
  stats_.backward_bytes += bytes;

  Tensor dwt = Tensor::empty(DType::F32, {N, K});
  std::copy(dweights.begin(), dweights.end(), dwt.data<float>());
  moe_route_backward(be, d_, p, g, a.local.x, a.local.scores, a.local.ids, be.to_device(dwt), router_dlogits, dx);
}

void node_limited_topk(const Tensor& scores, const Tensor& bias, int nodes, int node_limit, int top_k,
                       bool norm_topk_prob, float routed_scaling_factor, Tensor& ids, Tensor& weights) {
  const int64_t N = scores.dim(0), E = scores.dim(1), epn = E / nodes, per_node = top_k / node_limit;
  if (E % nodes != 0) input_error("node-limited routing: ", E, " experts do not split over ", nodes, " nodes");
  const float* s = scores.data<float>();
  std::vector<float> b(size_t(E), 0.0f);
  if (present(bias)) std::copy(bias.data<float>(), bias.data<float>() + E, b.begin());
  for (int64_t t = 0; t < N; ++t) {
    std::vector<float> biased(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) biased[size_t(e)] = s[t * E + e] + b[size_t(e)];
    std::vector<std::pair<float, int>> node_score;
    for (int n = 0; n < nodes; ++n) {
      std::vector<float> v(biased.begin() + n * epn, biased.begin() + (n + 1) * epn);
      std::sort(v.begin(), v.end(), std::greater<float>());
      float sum = 0;
      for (int64_t i = 0; i < std::min<int64_t>(per_node, epn); ++i) sum += v[size_t(i)];
      node_score.push_back({sum, n});
    }
    std::stable_sort(node_score.begin(), node_score.end(), [](auto& a, auto& c) { return a.first > c.first; });
    std::vector<char> allowed(size_t(nodes), 0);
    for (int i = 0; i < node_limit; ++i) allowed[size_t(node_score[size_t(i)].second)] = 1;
    std::vector<int> cand;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[size_t(e / epn)]) cand.push_back(int(e));
    std::stable_sort(cand.begin(), cand.end(), [&](int a, int c) { return biased[size_t(a)] > biased[size_t(c)]; });
    float denom = 0;
    for (int j = 0; j < top_k; ++j) denom += s[t * E + cand[size_t(j)]];
    for (int j = 0; j < top_k; ++j) {
      const int e = cand[size_t(j)];
      ids.data<int32_t>()[t * top_k + j] = e;
      const float w = norm_topk_prob ? s[t * E + e] / (denom + 1e-20f) : s[t * E + e];
      weights.data<float>()[t * top_k + j] = w * routed_scaling_factor;
    }
  }
}

std::vector<int64_t> global_expert_loads(Communicator& c, const Tensor& counts) {
  std::vector<int64_t> v(size_t(counts.numel()));
  for (size_t e = 0; e < v.size(); ++e) v[e] = counts.data<int32_t>()[e];
  c.all_reduce_sum(std::span<int64_t>(v));
  return v;
}

}  // namespace dsv3
