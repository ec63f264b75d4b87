// CPU kernels of optim::sdpa_forward, sdpa_backward, sdpa_forward_jvp and sdpa_backward_jvp (math, shapes and
// references: optim/hessian/_attention_ops.py).
//
// Work is cut into tiles of kQueryTile query rows × kKeyTile keys of one (batch, head). Nothing of size Tq × Tk is
// ever allocated: a tile's scores are recomputed from Q and K, and its probabilities from the saved lse
// (P = exp(S − lse)), except in the forward, which builds lse with an online softmax over the key tiles.
//   * forward and forward JVP: a parallel_for over batch × query heads × query tiles, each looping over key tiles
//     (the forward JVP in one pass: Ȯ = (P⊙Ṡ) V − r ⊙ O + P V̇ with r = Σ_j P⊙Ṡ);
//   * backward and backward JVP: a parallel_for over batch × query heads; each item owns its dQ rows and its own
//     (Tk, d) accumulators of dK and dV (O(B·Hq·Tk·d) in all, summed over each group of query heads at the end),
//     so no two threads write one element and nothing is recomputed across passes: one sweep over the
//     (query tile, key tile) pairs (the backward JVP keeps a query tile's P and Ṡ, 2 × 64 × Tk, between its two
//     sweeps over the key tiles: the first gives r and Ȯ, hence Ḋ, which the second needs).
// With is_causal a query tile skips the key tiles past its last row. The products inside a tile are ATen matmuls
// on (at most) 64 × 256 blocks, single-threaded inside the parallel region. Inputs of every dtype are computed in
// float32 (float64 for float64) and the results rounded once.
#include "attention.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace optim {
namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 256;

int64_t tiles(int64_t count, int64_t tile) { return (count + tile - 1) / tile; }

// Work items per thread at least: about 2^20 multiply-adds each, so that small problems (a few tokens or heads)
// run on the calling thread instead of paying a parallel region (much slower than the work on a busy machine).
int64_t grain(int64_t rows, int64_t keys, int64_t dims) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, rows * keys * dims));
}

// The operands in the working dtype, contiguous, and the (b, head, rows, keys) tiles of the scores and probabilities.
struct Attention {
  at::Tensor q, k, v, mask, lse_safe;
  bool mask_is_bool = false, causal = false;
  double scale = 1.0;
  int64_t batch = 0, heads = 0, kv_heads = 0, groups = 1, tq = 0, tk = 0;

  Attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
            const c10::optional<at::Tensor>& attn_mask, bool is_causal, double s) {
    const auto work = attention_work_dtype(query.scalar_type());
    q = query.to(work).contiguous();
    k = key.to(work).contiguous();
    v = value.to(work).contiguous();
    batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), groups = heads / kv_heads;
    tq = q.size(2), tk = k.size(2);
    causal = is_causal, scale = s;
    if (attn_mask.has_value()) {
      mask_is_bool = attn_mask->scalar_type() == at::kBool;
      // a broadcast view: a tile reads (and converts) only its own block
      mask = (mask_is_bool ? *attn_mask : attn_mask->to(work)).expand({batch, heads, tq, tk});
    }
  }

  void set_lse(const at::Tensor& lse) {
    // P = exp(S − lse); a row with no allowed key (lse = −∞) gets P = 0 instead of exp(−∞ + ∞) = NaN
    lse_safe = at::where(at::isneginf(lse), at::zeros_like(lse), lse).contiguous();
  }

  // keys [0, key_end) can be seen by rows before `row_end`
  int64_t key_end(int64_t row_end) const { return causal ? std::min(row_end, tk) : tk; }

  at::Tensor rows(const at::Tensor& t, int64_t b, int64_t h, int64_t i0, int64_t n) const {
    return t.select(0, b).select(0, h).narrow(0, i0, n);
  }
  at::Tensor keys(const at::Tensor& t, int64_t b, int64_t h, int64_t j0, int64_t n) const {
    return t.select(0, b).select(0, h / groups).narrow(0, j0, n);  // key/value head of query head h
  }

  at::Tensor scores(int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0, int64_t nj) const {
    at::Tensor s = at::matmul(rows(q, b, h, i0, ni), keys(k, b, h, j0, nj).t());
    s.mul_(scale);
    if (mask.defined()) {
      const at::Tensor m = mask.select(0, b).select(0, h).narrow(0, i0, ni).narrow(1, j0, nj);
      if (mask_is_bool) {
        s.masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
      } else {
        s.add_(m);
      }
    }
    if (causal && j0 + nj - 1 > i0) {  // the tile crosses the diagonal: forbid key j > row i
      AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sdpa_causal_tile", [&] {
        scalar_t* data = s.data_ptr<scalar_t>();
        const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t r = 0; r < ni; ++r) {
          for (int64_t c = std::max<int64_t>(0, i0 + r + 1 - j0); c < nj; ++c) data[r * nj + c] = minus_inf;
        }
      });
    }
    return s;
  }

  at::Tensor probabilities(int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0, int64_t nj) const {
    return at::exp(scores(b, h, i0, ni, j0, nj) - rows(lse_safe, b, h, i0, ni).unsqueeze(1));
  }

  // Ṡ = s·(Q̇ Kᵀ + Q K̇ᵀ) on a tile
  at::Tensor score_tangent(const at::Tensor& q_dot, const at::Tensor& k_dot, int64_t b, int64_t h, int64_t i0,
                           int64_t ni, int64_t j0, int64_t nj) const {
    at::Tensor s_dot = at::matmul(rows(q_dot, b, h, i0, ni), keys(k, b, h, j0, nj).t());
    s_dot.addmm_(rows(q, b, h, i0, ni), keys(k_dot, b, h, j0, nj).t());
    return s_dot.mul_(scale);
  }
};

// Runs `body(b, h, i0, ni)` for every query tile of every (batch, query head).
template <typename Body>
void for_query_tiles(const Attention& a, Body body) {
  const int64_t per_head = tiles(a.tq, kQueryTile);
  const int64_t items = a.batch * a.heads * per_head;
  at::parallel_for(0, items, grain(std::min(kQueryTile, a.tq), a.tk, a.q.size(3) + a.v.size(3)),
                   [&](int64_t first, int64_t last) {
    // parallel_for's worker threads do not inherit the caller's dispatch state: without this guard the tile
    // operations there would go through autograd (recording graphs on inputs that require grad)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t item = first; item < last; ++item) {
      const int64_t tile = item % per_head, h = (item / per_head) % a.heads, b = item / (per_head * a.heads);
      const int64_t i0 = tile * kQueryTile;
      body(b, h, i0, std::min(kQueryTile, a.tq - i0));
    }
  });
}

// Runs `body(b, h)` for every (batch, query head).
template <typename Body>
void for_heads(const Attention& a, Body body) {
  at::parallel_for(0, a.batch * a.heads, grain(a.tq, a.tk, a.q.size(3) + a.v.size(3)),
                   [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in for_query_tiles
    for (int64_t item = first; item < last; ++item) body(item / a.heads, item % a.heads);
  });
}

// (B, Hq, Tk, ·) per-query-head accumulators → (B, Hkv, Tk, ·) in `like`'s dtype: the sum over each group
at::Tensor reduce_groups(const at::Tensor& per_head, const Attention& a, const at::Tensor& like) {
  at::Tensor sum = a.groups == 1 ? per_head
                                 : per_head.view({a.batch, a.kv_heads, a.groups, a.tk, per_head.size(3)}).sum(2);
  return sum.to(like.scalar_type()).contiguous();
}

template <typename Body>
void over_keys(const Attention& a, int64_t i0, int64_t ni, Body body) {
  const int64_t end = a.key_end(i0 + ni);
  for (int64_t j0 = 0; j0 < end; j0 += kKeyTile) body(j0, std::min(kKeyTile, end - j0));
}

at::Tensor row_slice(const at::Tensor& t, int64_t b, int64_t h, int64_t i0, int64_t n) {
  return t.select(0, b).select(0, h).narrow(0, i0, n);
}

// --- forward: online softmax over the key tiles -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sdpa_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& attn_mask, bool is_causal,
                                                    double scale) {
  check_attention_args("sdpa_forward", q, k, v, attn_mask, scale);
  const Attention a(q, k, v, attn_mask, is_causal, scale);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, a.q.options());
  const double inf = std::numeric_limits<double>::infinity();
  for_query_tiles(a, [&](int64_t b, int64_t h, int64_t i0, int64_t ni) {
    at::Tensor running_max = at::full({ni}, -inf, a.q.options());
    at::Tensor sum = at::zeros({ni}, a.q.options());
    at::Tensor acc = at::zeros({ni, a.v.size(3)}, a.q.options());
    over_keys(a, i0, ni, [&](int64_t j0, int64_t nj) {
      const at::Tensor s = a.scores(b, h, i0, ni, j0, nj);
      const at::Tensor new_max = at::maximum(running_max, std::get<0>(s.max(1)));
      // rows with no allowed key so far keep max −∞: shift by 0 there (exp(−∞) = 0, not NaN)
      const at::Tensor shift = at::where(at::isneginf(new_max), at::zeros_like(new_max), new_max);
      const at::Tensor p = at::exp(s - shift.unsqueeze(1));
      const at::Tensor rescale = at::exp(running_max - shift);
      sum.mul_(rescale).add_(p.sum(1));
      acc.mul_(rescale.unsqueeze(1)).addmm_(p, a.keys(a.v, b, h, j0, nj));
      running_max.copy_(new_max);
    });
    const at::Tensor shift = at::where(at::isneginf(running_max), at::zeros_like(running_max), running_max);
    row_slice(lse, b, h, i0, ni).copy_(shift + at::log(sum));  // log 0 = −∞ for a row with no allowed key
    const at::Tensor empty = (sum == 0).unsqueeze(1);
    row_slice(out, b, h, i0, ni).copy_(at::where(empty, at::zeros_like(acc), acc / sum.unsqueeze(1)));
  });
  return {out, lse};
}

// --- backward ---------------------------------------------------------------------------------------------------

void check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                    const c10::optional<at::Tensor>& attn_mask, double scale) {
  check_attention_args(op, q, k, v, attn_mask, scale);
  check_attention_saved(op, q, v, out, lse);
  check_attention_same(op, "grad_out", grad_out, out.sizes(), q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const c10::optional<at::Tensor>& attn_mask,
                                                                 bool is_causal, double scale) {
  check_backward("sdpa_backward", grad_out, q, k, v, out, lse, attn_mask, scale);
  Attention a(q, k, v, attn_mask, is_causal, scale);
  a.set_lse(lse);
  const at::Tensor d_out = grad_out.to(a.q.scalar_type()).contiguous();
  const at::Tensor delta = (d_out * out.to(a.q.scalar_type())).sum(-1);  // D
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::zeros({a.batch, a.heads, a.tk, a.k.size(3)}, a.q.options());  // per query head
  at::Tensor grad_v = at::zeros({a.batch, a.heads, a.tk, a.v.size(3)}, a.q.options());
  for_heads(a, [&](int64_t b, int64_t h) {
    for (int64_t i0 = 0; i0 < a.tq; i0 += kQueryTile) {
      const int64_t ni = std::min(kQueryTile, a.tq - i0);
      const at::Tensor d_o = row_slice(d_out, b, h, i0, ni), q_rows = a.rows(a.q, b, h, i0, ni);
      at::Tensor acc = at::zeros({ni, a.q.size(3)}, a.q.options());
      over_keys(a, i0, ni, [&](int64_t j0, int64_t nj) {
        const at::Tensor p = a.probabilities(b, h, i0, ni, j0, nj);
        const at::Tensor d_s = p * at::matmul(d_o, a.keys(a.v, b, h, j0, nj).t())
                                       .sub_(row_slice(delta, b, h, i0, ni).unsqueeze(1));  // P ⊙ (dP − D)
        acc.addmm_(d_s, a.keys(a.k, b, h, j0, nj));
        row_slice(grad_k, b, h, j0, nj).addmm_(d_s.t(), q_rows);
        row_slice(grad_v, b, h, j0, nj).addmm_(p.t(), d_o);
      });
      row_slice(grad_q, b, h, i0, ni).copy_(acc.mul_(scale));
    }
  });
  return {grad_q, reduce_groups(grad_k.mul_(scale), a, k), reduce_groups(grad_v, a, v)};
}

// --- forward JVP ---------------------------------------------------------------------------------------------------

// Over the key tiles of one query tile: r = Σ_j P⊙Ṡ and Ȯ = Σ_j (P⊙Ṡ) V + P V̇ − r ⊙ O, in one pass
// (Ṗ V = (P⊙Ṡ) V − r ⊙ (P V), and P V is the saved O). With `keep`, the tiles of P and Ṡ are appended to it.
std::pair<at::Tensor, at::Tensor> output_tangent(const Attention& a, const at::Tensor& o, const at::Tensor& q_dot,
                                                 const at::Tensor& k_dot, const at::Tensor& v_dot, int64_t b,
                                                 int64_t h, int64_t i0, int64_t ni,
                                                 std::vector<at::Tensor>* keep = nullptr) {
  at::Tensor r = at::zeros({ni}, a.q.options());
  at::Tensor weighted = at::zeros({ni, a.v.size(3)}, a.q.options());  // Σ (P⊙Ṡ) V + P V̇
  over_keys(a, i0, ni, [&](int64_t j0, int64_t nj) {
    const at::Tensor p = a.probabilities(b, h, i0, ni, j0, nj);
    const at::Tensor s_dot = a.score_tangent(q_dot, k_dot, b, h, i0, ni, j0, nj);
    const at::Tensor ps = p * s_dot;
    r.add_(ps.sum(1));
    weighted.addmm_(ps, a.keys(a.v, b, h, j0, nj)).addmm_(p, a.keys(v_dot, b, h, j0, nj));
    if (keep != nullptr) {
      keep->push_back(p);
      keep->push_back(s_dot);
    }
  });
  return {r, weighted.sub_(row_slice(o, b, h, i0, ni) * r.unsqueeze(1))};
}

at::Tensor sdpa_forward_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& q_dot, const at::Tensor& k_dot,
                                const at::Tensor& v_dot, const c10::optional<at::Tensor>& attn_mask, bool is_causal,
                                double scale) {
  constexpr const char* op = "sdpa_forward_jvp";
  check_attention_args(op, q, k, v, attn_mask, scale);
  check_attention_saved(op, q, v, out, lse);
  check_attention_same(op, "q_dot", q_dot, q.sizes(), q);
  check_attention_same(op, "k_dot", k_dot, k.sizes(), q);
  check_attention_same(op, "v_dot", v_dot, v.sizes(), q);
  Attention a(q, k, v, attn_mask, is_causal, scale);
  a.set_lse(lse);
  const auto work = a.q.scalar_type();
  const at::Tensor qd = q_dot.to(work).contiguous(), kd = k_dot.to(work).contiguous(), vd = v_dot.to(work).contiguous();
  at::Tensor out_dot = at::empty_like(out, at::MemoryFormat::Contiguous);
  const at::Tensor o = out.to(work).contiguous();
  for_query_tiles(a, [&](int64_t b, int64_t h, int64_t i0, int64_t ni) {
    row_slice(out_dot, b, h, i0, ni).copy_(output_tangent(a, o, qd, kd, vd, b, h, i0, ni).second);
  });
  return out_dot;
}

// --- backward JVP --------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_jvp_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out_dot, const at::Tensor& q_dot, const at::Tensor& k_dot,
    const at::Tensor& v_dot, const c10::optional<at::Tensor>& attn_mask, bool is_causal, double scale) {
  constexpr const char* op = "sdpa_backward_jvp";
  check_backward(op, grad_out, q, k, v, out, lse, attn_mask, scale);
  check_attention_same(op, "grad_out_dot", grad_out_dot, out.sizes(), q);
  check_attention_same(op, "q_dot", q_dot, q.sizes(), q);
  check_attention_same(op, "k_dot", k_dot, k.sizes(), q);
  check_attention_same(op, "v_dot", v_dot, v.sizes(), q);
  Attention a(q, k, v, attn_mask, is_causal, scale);
  a.set_lse(lse);
  const auto work = a.q.scalar_type();
  const at::Tensor d_out = grad_out.to(work).contiguous(), d_out_dot = grad_out_dot.to(work).contiguous();
  const at::Tensor o = out.to(work).contiguous();
  const at::Tensor qd = q_dot.to(work).contiguous(), kd = k_dot.to(work).contiguous(), vd = v_dot.to(work).contiguous();
  const at::Tensor delta = (d_out * o).sum(-1);  // D
  at::Tensor grad_q_dot = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k_dot = at::zeros({a.batch, a.heads, a.tk, a.k.size(3)}, a.q.options());  // per query head
  at::Tensor grad_v_dot = at::zeros({a.batch, a.heads, a.tk, a.v.size(3)}, a.q.options());
  for_heads(a, [&](int64_t b, int64_t h) {
    std::vector<at::Tensor> kept;  // P and Ṡ of every key tile of the current query tile
    for (int64_t i0 = 0; i0 < a.tq; i0 += kQueryTile) {
      const int64_t ni = std::min(kQueryTile, a.tq - i0);
      kept.clear();
      const auto tangent = output_tangent(a, o, qd, kd, vd, b, h, i0, ni, &kept);
      const at::Tensor& r = tangent.first;  // Σ_j P⊙Ṡ per row
      const at::Tensor& o_dot = tangent.second;
      const at::Tensor d_o = row_slice(d_out, b, h, i0, ni), d_o_dot = row_slice(d_out_dot, b, h, i0, ni);
      const at::Tensor q_rows = a.rows(a.q, b, h, i0, ni), q_dot_rows = row_slice(qd, b, h, i0, ni);
      const at::Tensor delta_rows = row_slice(delta, b, h, i0, ni).unsqueeze(1);
      // Ḋ = Σ (dȮ ⊙ O + dO ⊙ Ȯ)
      const at::Tensor delta_dot = (d_o_dot * row_slice(o, b, h, i0, ni) + d_o * o_dot).sum(1, true);
      at::Tensor acc = at::zeros({ni, a.q.size(3)}, a.q.options());
      size_t index = 0;
      over_keys(a, i0, ni, [&](int64_t j0, int64_t nj) {
        const at::Tensor& p = kept[index++];
        const at::Tensor& s_dot = kept[index++];
        const at::Tensor p_dot = p * (s_dot - r.unsqueeze(1));  // Ṗ = P ⊙ (Ṡ − r)
        const at::Tensor v_tile = a.keys(a.v, b, h, j0, nj);
        const at::Tensor d_p = at::matmul(d_o, v_tile.t()).sub_(delta_rows);  // dP − D
        at::Tensor d_p_dot = at::matmul(d_o_dot, v_tile.t());                 // dṖ − Ḋ
        d_p_dot.addmm_(d_o, a.keys(vd, b, h, j0, nj).t()).sub_(delta_dot);
        const at::Tensor d_s = p * d_p;
        const at::Tensor d_s_dot = p_dot * d_p + p * d_p_dot;  // Ṗ ⊙ (dP − D) + P ⊙ (dṖ − Ḋ)
        acc.addmm_(d_s_dot, a.keys(a.k, b, h, j0, nj)).addmm_(d_s, a.keys(kd, b, h, j0, nj));
        row_slice(grad_k_dot, b, h, j0, nj).addmm_(d_s_dot.t(), q_rows).addmm_(d_s.t(), q_dot_rows);
        row_slice(grad_v_dot, b, h, j0, nj).addmm_(p_dot.t(), d_o).addmm_(p.t(), d_o_dot);
      });
      row_slice(grad_q_dot, b, h, i0, ni).copy_(acc.mul_(scale));
    }
  });
  return {grad_q_dot, reduce_groups(grad_k_dot.mul_(scale), a, k), reduce_groups(grad_v_dot, a, v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) {
  m.impl("sdpa_forward", &sdpa_forward_cpu);
  m.impl("sdpa_backward", &sdpa_backward_cpu);
  m.impl("sdpa_forward_jvp", &sdpa_forward_jvp_cpu);
  m.impl("sdpa_backward_jvp", &sdpa_backward_jvp_cpu);
}

}  // namespace optim
