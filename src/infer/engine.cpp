#include "infer/engine.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "infer/cuda_latent_attention.h"
#include "io/tokenizer.h"

namespace dsv3 {

struct Engine::Seq {
  int64_t id = -1, order = 0;
  Request req;
  StopStrings stops;
  std::vector<int32_t> tokens;  // prompt, then every output token (the last one not yet fed)
  int64_t n_prompt = 0, processed = 0, generated = 0;
  BlockTable table;
  Rng rng;
  // MTP: positions < mtp_valid hold true entries in every MTP layer; h⁰ rows from h0_start on.
  int64_t mtp_valid = 0, h0_start = 0;
  std::vector<float> h0;
  std::string text;
  size_t emitted = 0;
  bool decoding() const { return processed == int64_t(tokens.size()) - 1; }
};

namespace {
Weights on_backend(const Weights& w, Backend& be) {
  Weights out = w;
  if (be.device() == Device::CPU) return out;
  for (Param& p : out.params()) {
    if (p.w.device() != be.device()) p.w = be.to_device(p.w);
    if (present(p.scale_inv) && p.scale_inv.device() != be.device()) p.scale_inv = be.to_device(p.scale_inv);
  }
  return out;
}
}  // namespace

Engine::Engine(const Weights& w, const EngineOptions& opt, Backend& be)
    : opt_(opt), weights_(on_backend(w, be)), runner_(weights_, be) {
  const ModelConfig& c = runner_.config();
  if (opt.max_context < 0) input_error("--ctx-size: ", opt.max_context, " is negative (0 = max_position_embeddings)");
  max_context_ = opt.max_context > 0 ? std::min(opt.max_context, c.max_position_embeddings) : c.max_position_embeddings;
  n_valid_ = opt.n_valid > 0 ? std::min(opt.n_valid, c.vocab_size) : c.vocab_size;
  if (opt.draft_tokens < 0 || opt.draft_tokens > 16)
    input_error("--mtp: ", opt.draft_tokens, " draft tokens is out of range (expected 0..16)");
  if (opt.draft_tokens > 0 && runner_.num_mtp() == 0)
    input_error("--mtp ", opt.draft_tokens, ": the model in ", w.source(),
                " has no MTP modules (num_nextn_predict_layers = 0)");
  if (opt.prefill_chunk < 1) input_error("prefill chunk ", opt.prefill_chunk, " must be >= 1");
  if (opt.max_step_tokens < 1 + opt.draft_tokens)
    input_error("max step tokens ", opt.max_step_tokens, " must be >= 1 + draft tokens (", 1 + opt.draft_tokens, ")");
  if (opt.max_running < 1) input_error("max running sequences ", opt.max_running, " must be >= 1");
  runner_.set_small_rows(opt.small_rows);
  runner_.set_sync_free(opt.sync_free);
  runner_.set_device_gemv_rows(opt.device_gemv_rows);
  draft_ = opt.draft_tokens;
  // Speculation keeps graphs of the verification step and of the MTP modules' row counts.
  runner_.set_cuda_graphs(opt.cuda_graphs, draft_ > 0 ? 8 : 4);
  const int64_t layers = c.num_hidden_layers + (draft_ > 0 ? runner_.num_mtp() : 0);
  on_device_ = be.device() != Device::CPU;
  KvCacheOptions co = opt.cache;
  if (on_device_) {
    co.dtype = DType::BF16;  // the device cache is BF16 (cuda_mla_decode's operand type)
    co.host_storage = false;
  }
  pool_ = std::make_unique<LatentKvPool>(layers, c.kv_lora_rank, c.qk_rope_head_dim, co);
  if (!on_device_) {
    auto host = std::make_unique<LatentAttention>(*pool_, runner_.absorbed(), runner_.dims());
    tables_ = &host->tables;
    cache_ = std::move(host);
    return;
  }
#ifdef DSV3_HAVE_CUDA
  auto dev = std::make_unique<CudaLatentAttention>(*pool_, runner_.absorbed(), runner_.dims());
  tables_ = &dev->tables;
  cache_ = std::move(dev);
#else
  input_error("the inference engine on ", be.name(), " needs a CUDA build");
#endif
}

AttentionCache& Engine::cache_with(std::vector<BlockTable*> tables) {
  *tables_ = std::move(tables);
  return *cache_;
}

Tensor Engine::host(const Tensor& t) {
  return on_device_ && t.defined() && t.device() != Device::CPU ? runner_.backend().to_host(t) : t;
}

Engine::~Engine() = default;

int64_t Engine::add(Request r) {
  r.sampling.validate();
  if (r.prompt.empty()) input_error("empty prompt: at least one token is needed");
  if (r.max_tokens < 1) input_error("-n: max tokens ", r.max_tokens, " must be >= 1");
  if (int64_t(r.prompt.size()) > max_context_)
    input_error("prompt of ", r.prompt.size(), " tokens is longer than the context of ", max_context_, " tokens");
  const int64_t V = runner_.config().vocab_size;
  for (size_t i = 0; i < r.prompt.size(); ++i)
    if (r.prompt[i] < 0 || r.prompt[i] >= V)
      input_error("prompt token ", i, ": id ", r.prompt[i], " is outside the vocabulary [0, ", V, ")");
  // max_tokens saturated first: -n near INT64_MAX would wrap the sum negative, pass the pool check and
  // leave a lone sequence preempting itself forever.
  const int64_t gen = std::min<int64_t>(r.max_tokens, max_context_);
  const int64_t need = std::min<int64_t>(int64_t(r.prompt.size()) + gen, max_context_) + draft_;
  if (pool_->blocks_for(need) > pool_->num_blocks())
    input_error("a sequence of up to ", need, " tokens (prompt ", r.prompt.size(), " + max tokens ", r.max_tokens,
                draft_ ? cat(" + drafts ", draft_) : std::string(), ") does not fit the KV cache pool of ",
                pool_->capacity_tokens(), " tokens; raise the cache budget or lower -n");
  if (!r.stop_strings.empty() && !opt_.token_text)
    internal_error("stop strings need EngineOptions::token_text");
  auto s = std::make_unique<Seq>();
  s->id = next_id_++;
  s->stops = StopStrings(r.stop_strings);
  s->tokens = r.prompt;
  s->n_prompt = int64_t(r.prompt.size());
  s->rng.seed = r.sampling.seed;
  s->req = std::move(r);
  stats_.prompt_tokens += s->n_prompt;
  const int64_t id = s->id;
  waiting_.push_back(std::move(s));
  return id;
}

SeqEvent& Engine::event_for(std::vector<SeqEvent>& ev, int64_t id) {
  for (auto& e : ev)
    if (e.id == id) return e;
  ev.emplace_back();
  ev.back().id = id;
  return ev.back();
}

void Engine::preempt(Seq& s, std::vector<SeqEvent>& ev) {
  pool_->release(s.table);
  stats_.recomputed_tokens += s.processed;
  s.processed = 0;
  s.mtp_valid = 0;
  s.h0_start = 0;
  s.h0.clear();
  ++stats_.preemptions;
  event_for(ev, s.id).preempted = true;
  for (size_t i = 0; i < running_.size(); ++i)
    if (running_[i].get() == &s) {
      waiting_.push_front(std::move(running_[i]));
      running_.erase(running_.begin() + std::ptrdiff_t(i));
      return;
    }
}

// Append output tokens, applying stop ids, max tokens, the context limit and stop strings.
void Engine::emit(Seq& s, std::span<const int32_t> toks, SeqEvent& e) {
  for (int32_t t : toks) {
    if (std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), t) != s.req.stop_ids.end()) {
      e.finished = true;
      e.finish_reason = "stop";
      break;
    }
    s.tokens.push_back(t);
    e.tokens.push_back(t);
    ++s.generated;
    ++stats_.generated_tokens;
    if (opt_.token_text) s.text += opt_.token_text(t);
    if (!s.stops.empty()) {
      const size_t p = s.stops.find(s.text, s.emitted);
      if (p != std::string::npos) {
        s.text.resize(p);
        e.finished = true;
        e.finish_reason = "stop";
        break;
      }
    }
    if (s.generated >= s.req.max_tokens || int64_t(s.tokens.size()) >= max_context_) {
      e.finished = true;
      e.finish_reason = "length";
      break;
    }
  }
  if (!opt_.token_text) return;
  size_t upto = s.text.size();
  if (!e.finished) {
    upto = utf8_complete_prefix(s.text);
    upto = std::min(upto, s.stops.safe_prefix(std::string_view(s.text).substr(0, upto)));
  }
  if (upto > s.emitted) {
    e.text += s.text.substr(s.emitted, upto - s.emitted);
    s.emitted = upto;
  }
}

// MTP drafting for the sequences in `spec` (see spec_decode.h for the scheme).
void Engine::draft(std::vector<Seq*>& spec, std::vector<std::vector<int32_t>>& drafts,
                   std::vector<std::vector<std::vector<float>>>& qs) {
  const int64_t D = runner_.num_mtp(), H = runner_.dims().H, V = runner_.config().vocab_size;
  const size_t B = spec.size();
  drafts.assign(B, {});
  qs.assign(B, {});
  std::vector<int> want(B);
  for (size_t b = 0; b < B; ++b)
    want[b] = int(std::min<int64_t>({draft_, spec[b]->req.max_tokens - spec[b]->generated - 1,
                                     max_context_ - 1 - spec[b]->processed}));
  std::vector<BlockTable*> tables;
  for (Seq* s : spec) tables.push_back(&s->table);
  AttentionCache& cache = cache_with(std::move(tables));

  // On the device, greedy drafts without a penalty are the argmax there (ids read back, not logits),
  // unless the caller reads logits (then every choice is made on the host).
  bool dev_greedy = on_device_ && !on_logits;
  for (const Seq* s : spec) dev_greedy = dev_greedy && s->req.sampling.plain_argmax();
  const int max_want = B ? *std::max_element(want.begin(), want.end()) : 0;
  auto take_draft = [&](size_t b, const float* logits) {
    Seq& s = *spec[b];
    std::vector<int32_t> hist = s.tokens;
    hist.insert(hist.end(), drafts[b].begin(), drafts[b].end());
    std::span<const float> row(logits, size_t(V));
    if (s.req.sampling.greedy()) {
      drafts[b].push_back(greedy_token(row, n_valid_, hist, s.req.sampling.repeat_penalty));
    } else {
      std::vector<float> q;
      sampling_probs(row, n_valid_, hist, s.req.sampling, q);
      drafts[b].push_back(sample_from(q, s.rng));
      qs[b].push_back(std::move(q));
    }
  };
  // The drafts of a module's logits rows: row i for sequence seqs[i].
  auto take_drafts = [&](const std::vector<size_t>& seqs, const Tensor& logits) {
#ifdef DSV3_HAVE_CUDA
    if (dev_greedy && !seqs.empty()) {
      const std::vector<int32_t> ids = cuda_greedy_tokens(logits, n_valid_);
      for (size_t i = 0; i < seqs.size(); ++i) drafts[seqs[i]].push_back(ids[i]);
      return;
    }
#endif
    const Tensor l = host(logits);
    for (size_t i = 0; i < seqs.size(); ++i) take_draft(seqs[i], l.data<float>() + int64_t(i) * V);
  };

  // Chain over modules at the same positions; h_prev rows follow each module's rows.
  Tensor prev_h;
  std::vector<std::vector<int64_t>> prev_rows(B);  // per sequence, its rows in the previous module's output
  for (int64_t k = 1; k <= D; ++k) {
    StepRows rows;
    std::vector<int32_t> toks, logit_rows, hrow;
    std::vector<size_t> logit_seq;
    std::vector<std::vector<int64_t>> my_rows(B);
    for (size_t b = 0; b < B; ++b) {
      Seq& s = *spec[b];
      const int64_t n = s.processed;
      const int64_t avail = std::min<int64_t>(k - 1, want[b]);
      const int64_t jmax = n - k + avail, jmin = s.mtp_valid;
      for (int64_t j = jmin; j <= jmax; ++j) {
        my_rows[b].push_back(rows.size());
        rows.seq.push_back(int32_t(b));
        rows.pos.push_back(j);
        const int64_t ti = j + k;
        toks.push_back(ti <= n ? s.tokens[size_t(ti)] : drafts[b][size_t(ti - n - 1)]);
        hrow.push_back(k == 1 ? int32_t(j - s.h0_start) : int32_t(prev_rows[b][size_t(j - jmin)]));
        if (j == n - 1 && k <= want[b]) {
          logit_rows.push_back(int32_t(rows.size() - 1));
          logit_seq.push_back(b);
        }
      }
    }
    if (rows.size() == 0) break;
    Tensor h_in = Tensor::empty(DType::F32, {rows.size(), H});
    for (int64_t r = 0; r < rows.size(); ++r) {
      const size_t b = size_t(rows.seq[size_t(r)]);
      const float* src = k == 1 ? spec[b]->h0.data() + size_t(hrow[size_t(r)]) * size_t(H)
                                : prev_h.data<float>() + size_t(hrow[size_t(r)]) * size_t(H);
      std::memcpy(h_in.data<float>() + r * H, src, size_t(H) * sizeof(float));
    }
    ModelRunner::Output o = runner_.mtp_forward(int(k), cache, rows, toks, h_in, logit_rows, true);
    take_drafts(logit_seq, o.logits);
    // h^k feeds the next module, or this one again beyond D.
    if (k < D || max_want > D) prev_h = host(o.hidden);
    prev_rows = my_rows;
  }
  // Beyond D: the last module, one position further each step, on its own output and last draft.
  for (int s_i = int(D) + 1;; ++s_i) {
    StepRows rows;
    std::vector<int32_t> toks, logit_rows;
    std::vector<size_t> seqs;
    Tensor h_in;
    std::vector<int64_t> src_rows;
    for (size_t b = 0; b < B; ++b) {
      if (want[b] < s_i || prev_rows[b].empty()) continue;
      seqs.push_back(b);
      rows.seq.push_back(int32_t(b));
      rows.pos.push_back(spec[b]->processed - 1 + (s_i - D));
      toks.push_back(drafts[b].back());
      logit_rows.push_back(int32_t(rows.size() - 1));
      src_rows.push_back(prev_rows[b].back());
    }
    if (seqs.empty()) break;
    h_in = Tensor::empty(DType::F32, {rows.size(), H});
    for (size_t i = 0; i < seqs.size(); ++i)
      std::memcpy(h_in.data<float>() + int64_t(i) * H, prev_h.data<float>() + src_rows[i] * H, size_t(H) * sizeof(float));
    ModelRunner::Output o = runner_.mtp_forward(int(D), cache, rows, toks, h_in, logit_rows, true);
    take_drafts(seqs, o.logits);
    for (size_t i = 0; i < seqs.size(); ++i) prev_rows[seqs[i]] = {int64_t(i)};
    if (max_want > s_i) prev_h = host(o.hidden);
  }
}

std::vector<SeqEvent> Engine::step() {
  std::vector<SeqEvent> ev;
  // Admit while the pool has room for the newcomer's first chunk, keeping a block of headroom per
  // running sequence (a sequence that would only be preempted again waits instead).
  int64_t room = pool_->free_blocks() - int64_t(running_.size());
  while (!waiting_.empty() && int64_t(running_.size()) < opt_.max_running) {
    const Seq& w = *waiting_.front();
    const int64_t need = pool_->blocks_for(std::min<int64_t>(int64_t(w.tokens.size()), opt_.prefill_chunk) + draft_ + 1);
    if (!running_.empty() && need > room) break;
    room -= need;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    running_.back()->order = admit_order_++;
  }
  std::sort(running_.begin(), running_.end(), [](const auto& a, const auto& b) { return a->order < b->order; });
  const bool mtp = draft_ > 0;

  // Plan: rows per sequence, with cache reserved (preempting the newest sequences when needed).
  struct Plan {
    Seq* s;
    int64_t n_feed;
    bool spec;
  };
  std::vector<Plan> plan;
  int64_t budget = opt_.max_step_tokens;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Seq& s = *running_[i];
    int64_t n_feed = std::min<int64_t>(int64_t(s.tokens.size()) - s.processed, opt_.prefill_chunk);
    n_feed = std::min(n_feed, budget);
    const bool spec = mtp && s.decoding() && s.req.max_tokens - s.generated > 1 &&
                      s.processed + 1 < max_context_ - 1 && budget >= 1 + draft_;
    const int64_t need = s.processed + n_feed + (spec ? draft_ : 0);
    bool preempted_self = false;
    while (!pool_->reserve(s.table, need)) {
      Seq* victim = running_.back().get();
      preempt(*victim, ev);
      if (victim == &s) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;
    plan.push_back({&s, n_feed, spec});
    budget -= n_feed + (spec ? draft_ : 0);
    ++i;
  }
  if (plan.empty()) return ev;

  // Drafts for the speculating sequences.
  std::vector<Seq*> spec_seqs;
  for (auto& p : plan)
    if (p.spec) spec_seqs.push_back(p.s);
  std::vector<std::vector<int32_t>> drafts;
  std::vector<std::vector<std::vector<float>>> qs;
  if (!spec_seqs.empty()) draft(spec_seqs, drafts, qs);
  if (opt_.override_drafts)
    for (size_t i = 0; i < spec_seqs.size(); ++i)
      if (spec_seqs[i]->req.sampling.greedy())
        drafts[i] = opt_.override_drafts(spec_seqs[i]->id, spec_seqs[i]->tokens, drafts[i].size());
  if (on_drafts)
    for (size_t i = 0; i < spec_seqs.size(); ++i) on_drafts(spec_seqs[i]->id, drafts[i]);

  // One forward over every planned row.
  std::vector<BlockTable*> tables;
  StepRows rows;
  std::vector<int32_t> toks, logit_rows;
  std::vector<int64_t> first_row(plan.size());
  size_t si = 0;
  for (size_t pi = 0; pi < plan.size(); ++pi) {
    Seq& s = *plan[pi].s;
    tables.push_back(&s.table);
    first_row[pi] = rows.size();
    std::vector<int32_t> feed(s.tokens.begin() + s.processed, s.tokens.begin() + s.processed + plan[pi].n_feed);
    if (plan[pi].spec) {
      feed.insert(feed.end(), drafts[si].begin(), drafts[si].end());
      ++si;
    }
    const bool reaches_end = s.processed + plan[pi].n_feed == int64_t(s.tokens.size());
    for (size_t j = 0; j < feed.size(); ++j) {
      rows.seq.push_back(int32_t(pi));
      rows.pos.push_back(s.processed + int64_t(j));
      toks.push_back(feed[j]);
      // Logits for the last prompt/decode row and every draft row (all rows in all_logits mode).
      if (opt_.all_logits || (reaches_end && int64_t(j) >= plan[pi].n_feed - 1))
        logit_rows.push_back(int32_t(rows.size() - 1));
    }
  }
  // A decode step (every sequence feeds its next token, and its drafts when speculating) may replay
  // a CUDA graph.
  bool decode_step = true;
  for (const Plan& p : plan) decode_step = decode_step && p.n_feed == 1 && p.s->decoding();
  ModelRunner::Output out = runner_.forward(cache_with(std::move(tables)), rows, toks, logit_rows, decode_step);
  // On the device, steps whose sequences all decode greedily without a penalty take the argmax of
  // every logits row there (the tokens, or the verification of drafts); the others sample on the host.
  std::vector<int32_t> dev_ids;
  if (on_device_) {
    bool greedy = !on_logits;
    for (const Plan& p : plan) greedy = greedy && p.s->req.sampling.plain_argmax();
#ifdef DSV3_HAVE_CUDA
    if (greedy && !logit_rows.empty()) {
      dev_ids = cuda_greedy_tokens(out.logits, n_valid_);
      ++device_greedy_steps_;
    }
#endif
    if (dev_ids.empty()) out.logits = host(out.logits);
    if (mtp) out.hidden = host(out.hidden);
  }
  ++stats_.steps;
  stats_.forward_rows += rows.size();
  const int64_t V = runner_.config().vocab_size, H = runner_.dims().H;
  auto has_logits = [&](int64_t row) {
    return std::binary_search(logit_rows.begin(), logit_rows.end(), int32_t(row));
  };
  auto logit_index = [&](int64_t row) -> int64_t {
    const auto it = std::lower_bound(logit_rows.begin(), logit_rows.end(), int32_t(row));
    DSV3_CHECK(it != logit_rows.end() && *it == row, "no logits for row ", row);
    return it - logit_rows.begin();
  };
  auto logits_of = [&](int64_t row) -> std::span<const float> {
    return {out.logits.data<float>() + logit_index(row) * V, size_t(V)};
  };

  si = 0;
  std::vector<Seq*> done;
  for (size_t pi = 0; pi < plan.size(); ++pi) {
    Seq& s = *plan[pi].s;
    const int64_t n0 = s.processed, nf = plan[pi].n_feed, r0 = first_row[pi];
    const bool reaches_end = n0 + nf == int64_t(s.tokens.size());
    std::vector<int32_t> produced;
    int64_t kept_rows = nf;  // rows whose cache entries and hidden states are final
    if (reaches_end) {
      if (plan[pi].spec) {
        const std::vector<int32_t>& d = drafts[si];
        const SamplingParams& sp = s.req.sampling;
        SpecVerdict v;
        if (sp.greedy()) {
          std::vector<int32_t> hist = s.tokens;
          for (size_t i = 0; i <= d.size(); ++i) {
            const int64_t row = r0 + int64_t(i);
            const int32_t g = dev_ids.empty() ? greedy_token(logits_of(row), n_valid_, hist, sp.repeat_penalty)
                                              : dev_ids[size_t(logit_index(row))];
            if (i == d.size() || d[i] != g) {
              v.next = g;
              break;
            }
            ++v.accepted;
            hist.push_back(d[i]);
          }
        } else {
          std::vector<std::vector<float>> p(d.size() + 1);
          std::vector<int32_t> hist = s.tokens;
          for (size_t i = 0; i <= d.size(); ++i) {
            sampling_probs(logits_of(r0 + int64_t(i)), n_valid_, hist, sp, p[i]);
            if (i < d.size()) hist.push_back(d[i]);
          }
          v = speculative_verify(d, qs[si], p, s.rng);
        }
        produced.assign(d.begin(), d.begin() + v.accepted);
        produced.push_back(v.next);
        kept_rows = 1 + v.accepted;
        stats_.spec.record(int(d.size()), v.accepted, v.accepted + 1);
        s.mtp_valid = std::max<int64_t>(0, n0 - runner_.num_mtp() + 1);
        ++si;
      } else if (!dev_ids.empty()) {
        produced.push_back(dev_ids[size_t(logit_index(r0 + nf - 1))]);
      } else {
        produced.push_back(sample_token(logits_of(r0 + nf - 1), n_valid_, s.tokens, s.req.sampling, s.rng));
      }
    }
    if (on_logits)
      for (int64_t j = 0; j < kept_rows; ++j)
        if (has_logits(r0 + j)) on_logits(s.id, n0 + j, logits_of(r0 + j));
    s.processed = n0 + kept_rows;
    s.table.length = s.processed;
    pool_->truncate(s.table, s.processed);
    if (mtp) {
      // Keep h⁰ of the final rows; drop rows no MTP module will read again.
      const size_t old = s.h0.size();
      s.h0.resize(old + size_t(kept_rows * H));
      std::memcpy(s.h0.data() + old, out.hidden.data<float>() + r0 * H, size_t(kept_rows * H) * sizeof(float));
      const int64_t drop = s.mtp_valid - s.h0_start;
      if (drop > 0) {
        s.h0.erase(s.h0.begin(), s.h0.begin() + drop * H);
        s.h0_start = s.mtp_valid;
      }
    }
    if (!produced.empty()) {
      SeqEvent& e = event_for(ev, s.id);
      emit(s, produced, e);
      if (e.finished) done.push_back(&s);
    }
  }
  for (Seq* s : done) {
    pool_->release(s->table);
    for (size_t i = 0; i < running_.size(); ++i)
      if (running_[i].get() == s) {
        running_.erase(running_.begin() + std::ptrdiff_t(i));
        break;
      }
  }
  return ev;
}

std::vector<std::vector<int32_t>> Engine::run_all() {
  std::map<int64_t, std::vector<int32_t>> out;
  for (auto& s : waiting_) out[s->id];
  for (auto& s : running_) out[s->id];
  while (has_work())
    for (const SeqEvent& e : step()) out[e.id].insert(out[e.id].end(), e.tokens.begin(), e.tokens.end());
  std::vector<std::vector<int32_t>> res;
  for (auto& [id, t] : out) res.push_back(std::move(t));
  return res;
}

}  // namespace dsv3
