// Expert parallelism for one DeepSeekMoE layer (DESIGN §5, paper_facts §3.6): the routed experts
// are split into contiguous blocks over the EP ranks (rank r owns experts r·E/P … (r+1)·E/P − 1);
// every rank keeps its own tokens, the router and the shared experts.
//
// Forward, per rank:
//   router (as moe_forward; optionally node-limited) → for each destination rank, the tokens with
//   at least one pick there, ascending → exchange row counts → all_to_all_v of one row per
//   (token, destination rank): [src rank, token, K expert ids, K gate weights, hidden state]
//   (the hidden state once, however many of the token's experts live there; F32 or FP8 E4M3 with
//   one F32 scale per 1×128 tile) → expert MLPs over their rows in (source rank, token) order →
//   each arrived row's weighted sum over its experts → all_to_all_v back (combine) → the source
//   adds the partial sums in rank order, plus the shared experts.
// Two-hop (plane-aware) dispatch: a token crosses to another node only to the rank with the same
// local index there (one row per token and node), which forwards it within its node; combine
// returns the same way, the middle rank adding its node's partial sums first.
// Backward mirrors it: dout goes out along the dispatch path, the experts' backward runs on their
// rows, and the per-row input gradients plus the gate-weight gradients come back along the
// combine path; router and gate backward run at the source.
//
// Equality with the single-process moe_forward on the concatenated tokens of all ranks (rank order):
//   - expert weight gradients: bitwise (same rows in the same order through the same ops);
//   - outputs and dx: bitwise when no rank holds two of a token's experts (e.g. E = P), since the
//     source then adds w·y in expert order exactly as scatter_add_rows does; otherwise the partial
//     sums regroup float additions (tolerance in docs/distributed.md);
//   - router/gate gradients are per-rank partial sums: a data-parallel all-reduce adds them.
//
// The routing plan (which token goes to which rank with which picks, and how many rows come back
// from each rank) is derived once per forward from one host copy of the router's ids and weights,
// and kept in EpMoeActs: the combine and the backward reuse it instead of copying the ids again
// and exchanging the same counts again.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "model/model.h"

namespace dsv3 {

struct EpOptions {
  int node_limit = 0;         // M > 0: each token's experts lie on at most M nodes
  bool two_hop = false;       // cross nodes only between equal local ranks, then forward inside the node
  bool fp8_dispatch = false;  // dispatch payload E4M3, power-of-two scales per 1×128 tile (combine stays F32)
  bool host_rows = false;     // tests: the host-row path even where the direct one applies
};

// Bytes this rank sent (payload and metadata), accumulated over calls.
struct EpStats {
  int64_t dispatch_bytes = 0, combine_bytes = 0;  // forward dispatch / combine
  int64_t dispatch_rows = 0, combine_rows = 0;
  int64_t inter_node_bytes = 0, intra_node_bytes = 0;  // of both, split by where the receiver is (self excluded)
  int64_t backward_bytes = 0;
  int64_t plans = 0;  // routing plans derived (each = one host copy of the router's ids and weights)
};

// A received row on the expert side: (source rank, source token) and the experts of this rank it needs.
struct EpRow {
  int32_t src = 0, token = 0;
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

// This rank's routing, from the forward's router (see the header comment).
struct EpPlan {
  Tensor ids, weights;  // host [N, K]: the router's picks
  // Hop-1 rows in send order (destination rank ascending, tokens ascending within one): row i carries
  // token send_tok[i] and the picks q in [pick_begin[i], pick_begin[i+1]) (experts ascending):
  // expert pick_expert[q], weight pick_weight[q], found at ids[pick_slot[q]] (= t·K + j).
  std::vector<int32_t> send_tok;
  std::vector<int64_t> pick_begin;
  std::vector<int32_t> pick_expert;
  std::vector<float> pick_weight;
  std::vector<int64_t> pick_slot;
  std::vector<int64_t> send_rows;  // [P] hop-1 rows to each rank
  std::vector<int64_t> recv_rows;  // [P] arrived rows from each source rank
  Tensor send_tok_t;               // send_tok on the backend (I32): the direct path's gathers and scatters
};

struct EpMoeActs {
  MoeActs local;              // the source side: x, logits, scores, ids, weights, counts, shared, out
  EpPlan plan;                // the routing, derived once in the forward
  std::vector<EpRow> rows;    // expert side: arrived rows, (src, token) order
  Tensor xin;                 // [R, H] their hidden states (dequantized when FP8)
  std::vector<int32_t> pick_row;   // sorted pick → arrived row (local experts ascending)
  std::vector<float> pick_w;
  std::vector<int64_t> offsets;    // [E/P + 1] local expert e owns picks offsets[e]..offsets[e+1]
  Tensor pick_row_t, pick_w_t;     // the two above as tensors ([Rp] I32, [Rp] F32)
  MlpActs routed;                  // expert MLP activations over the Rp picks
};

class ExpertParallelMoe {
 public:
  // InputError when n_routed_experts is not a multiple of the EP size, or node_limit/two_hop do
  // not fit the node layout.
  ExpertParallelMoe(Communicator& ep, const ModelDims& d, EpOptions o = {});

  int64_t experts_per_rank() const { return epr_; }
  int64_t first_expert() const { return int64_t(c_.rank()) * epr_; }
  int owner(int64_t expert) const { return int(expert / epr_); }

  // x: this rank's tokens [N, H]. p.experts must hold at least this rank's experts.
  void forward(Backend& be, const MoeParams& p, const Tensor& x, EpMoeActs& a);
  // As moe_backward: dx (+)= ∂L/∂x; gradients of the router gate, the shared experts and this
  // rank's experts accumulate into g.
  void backward(Backend& be, const MoeParams& p, const MoeParams& g, const EpMoeActs& a, const Tensor& dout,
                const Tensor& router_dlogits, const Tensor& dx, bool accumulate_dx);

  const EpStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

 private:
  void route(Backend& be, const MoeParams& p, const Tensor& x, MoeActs& a);
  // The plan's host side from the router's ids and weights (one host copy of each), and send_tok_t.
  void make_plan(Backend& be, const MoeActs& a, EpPlan& plan);
  // Sends the plan's rows with the payload rows of `payload` (F32 [N, H]) inside host rows (two-hop
  // forwarding included); returns the arrived rows in (src, token) order and their payload as F32 [R, H].
  Tensor dispatch_rows(Backend& be, const EpPlan& plan, const Tensor& payload, bool fp8, std::vector<EpRow>& rows,
                       int64_t& bytes);
  // Returns per arrived row a partial [R, H] (+ per expert values) to its source; the source gets
  // [N, H] summed in rank order (into `out`, which must be zero or hold what to add to) and, when
  // vals is non-null, the per-(token, slot) values in vals [N·K].
  void combine(Backend& be, const EpPlan& plan, const std::vector<EpRow>& rows, const Tensor& partial,
               const std::vector<std::vector<float>>* row_vals, int64_t N, Tensor& out, std::vector<float>* vals,
               int64_t& bytes);

  // A token's picks grouped by the rank they go to (hop 1), experts ascending; slots[i] = j where
  // the token's pick j is experts[i].
  struct Group {
    int dest;
    std::vector<int32_t> experts;
    std::vector<float> weights;
    std::vector<int32_t> slots;
  };
  void token_groups(const int32_t* id, const float* wt, std::vector<Group>& out) const;
  // Single hop with an F32 payload, and a communicator that reads the backend's memory (any on the
  // CPU; NCCL on the GPU): the hidden states move as one block per rank straight from the
  // backend's buffers (the _direct variants; on GPUs they never touch the host). Otherwise (two-hop,
  // FP8 payload) they travel inside host rows.
  bool direct_path(const Backend& be, bool fp8) const;
  // As dispatch_rows; also sets plan.recv_rows from the exchanged counts.
  Tensor dispatch_direct(Backend& be, EpPlan& plan, const Tensor& payload, std::vector<EpRow>& rows,
                         int64_t& bytes);
  // The payload alone along the plan's rows (the backward's dout: the metadata arrived in the forward).
  Tensor send_direct(Backend& be, const EpPlan& plan, const Tensor& payload, int64_t& bytes);
  void combine_direct(Backend& be, const EpPlan& plan, const std::vector<EpRow>& rows, const Tensor& partial,
                      const std::vector<std::vector<float>>* row_vals, Tensor& out, std::vector<float>* vals,
                      int64_t& bytes);

  Communicator& c_;
  ModelDims d_;
  EpOptions o_;
  int64_t epr_ = 0;
  EpStats stats_;
};

// Node-limited top-k (paper §2.1.2; DESIGN §3 router otherwise): per token, nodes are ranked by the
// sum of their top K/M biased scores (s + bias), the best M nodes are kept (ties to the lower
// node), then the top K biased scores among their experts (ties to the lower id, ids in descending
// score order). Weights = unbiased s of the picks (normalised when norm_topk_prob) × scale.
// scores [N, E] host F32; experts_per_node = E / nodes.
void node_limited_topk(const Tensor& scores, const Tensor& bias, int nodes, int node_limit, int top_k,
                       bool norm_topk_prob, float routed_scaling_factor, Tensor& ids, Tensor& weights);

// Global per-expert loads: counts [E] (I32, this rank's tokens) summed over the group, so every
// rank applies the same aux-loss-free bias update.
std::vector<int64_t> global_expert_loads(Communicator& c, const Tensor& counts);

}  // namespace dsv3
