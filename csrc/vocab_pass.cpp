// Native CPU kernel of the fused vocabulary pass.
//
// For each row of a logits chunk (raw h·Wᵀ, not yet divided by τ; RL rows use τ, SFT rows τ = 1, and
// without old log-probs RL rows are on-policy: ratio ≡ 1) it streams once over V for the
// log-sum-exp, the target log-prob and the entropy, computes the per-row RL/SFT loss and its scalar
// dL/dlog p, and (training mode) overwrites the row in place with dLoss/d(raw logits) in a second
// sweep. The float64 contract is kernels/reference.py; tests/test_vocab_pass_native.py checks it.
//
// Non-finite inputs propagate as in the float64 reference: a NaN or +inf logit makes the row's
// sums NaN (the exp floor below lets NaN through), so its loss, log p, entropy and whole gradient
// row are NaN, and a NaN advantage / old / ref / scale makes the gradient row NaN. Detecting it in
// the row statistics costs nothing per element; a −inf logit is still a masked token (p = 0).
//
// Vector code uses GCC/Clang vector extensions rather than intrinsics, so the same source compiles
// to AVX-512, AVX2 or NEON depending on -march; the exp is our own (range reduction + polynomial)
// because libm's expf does not vectorize and ATen's vectorized exp needs Sleef at build time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "passes.h"
#include "simd.h"

namespace {

using namespace afrl_simd;
using namespace afrl_checks;

// ---- streaming log-sum-exp / entropy statistics -----------------------------------------------

// Over a range of raw logits x: mx = max x, sum = Σ e^d, dsum = Σ e^d·d with d = (x − mx)·inv_temp.
// Keeping d relative to the max (not z itself) is what keeps the entropy accurate at |z| ~ 1e4:
// entropy = log sum − dsum/sum needs no cancellation between two large numbers.
struct Stats {
  float mx = kNegInf;
  double sum = 0.0;
  double dsum = 0.0;
};

// Online merge: rescale both parts to the common max. e^{d−δ} = e^d·e^{−δ}, and the d·e^d sum
// picks up the shift: Σ e^{d'}d' = e^{δ}(dsum + δ·sum) with δ = (mx_part − mx)·inv_temp ≤ 0.
inline Stats merge(const Stats& a, const Stats& b, double inv_temp) {
  if (a.sum == 0.0) return b;
  if (b.sum == 0.0) return a;
  Stats out;
  out.mx = std::max(a.mx, b.mx);
  const double da = (double(a.mx) - out.mx) * inv_temp, db = (double(b.mx) - out.mx) * inv_temp;
  const double ea = std::exp(da), eb = std::exp(db);
  out.sum = a.sum * ea + b.sum * eb;
  out.dsum = ea * (a.dsum + da * a.sum) + eb * (b.dsum + db * b.sum);
  return out;
}

// One tile (≤ kTile values): a max pass, then an exp pass that re-reads the tile from L1.
// Tile sums are fp32 over ≤ 64 terms per lane, then folded into doubles: blocked summation keeps
// the row sums accurate at V = 151936 for the price of one horizontal add per tile.
template <typename T>
Stats tile_stats(const T* x, int64_t n, float inv_temp) {
  const int64_t nv = n - n % kW;
  vf mv = splat(kNegInf);
  for (int64_t i = 0; i < nv; i += kW) mv = vmax(mv, load(x + i));
  if (nv < n) mv = vmax(mv, load_tail(x + nv, n - nv, kNegInf));
  Stats st;
  st.mx = hmax(mv);
  if (st.mx == kNegInf) {  // all -inf contributes nothing, unless the max pass dropped a NaN
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(static_cast<float>(x[i]))) st.sum = std::numeric_limits<double>::quiet_NaN();
    return st;
  }
  const vf m = splat(st.mx), floor = splat(kExpFloor);
  vf s0{}, s1{}, t0{}, t1{};  // two accumulator pairs: independent chains for ILP
  int64_t i = 0;
  for (; i + 2 * kW <= nv; i += 2 * kW) {
    const vf d0 = floor_keep_nan((load(x + i) - m) * inv_temp, floor);
    const vf d1 = floor_keep_nan((load(x + i + kW) - m) * inv_temp, floor);
    const vf e0 = exp_nonpos(d0), e1 = exp_nonpos(d1);
    s0 += e0; t0 += e0 * d0;
    s1 += e1; t1 += e1 * d1;
  }
  for (; i < n; i += kW) {  // at most one full vector plus the -inf padded tail
    const vf xv = i + kW <= n ? load(x + i) : load_tail(x + i, n - i, kNegInf);
    const vf d = floor_keep_nan((xv - m) * inv_temp, floor);
    const vf e = exp_nonpos(d);
    s0 += e; t0 += e * d;  // padded lanes: d = -88, e = 0
  }
  st.sum = hsum(s0 + s1);
  st.dsum = hsum(t0 + t1);
  return st;
}

template <typename T>
Stats range_stats(const T* x, int64_t lo, int64_t hi, double inv_temp) {
  Stats st;
  for (int64_t j = lo; j < hi; j += kTile)
    st = merge(st, tile_stats(x + j, std::min(kTile, hi - j), static_cast<float>(inv_temp)),
               inv_temp);
  return st;
}

// Second sweep over [lo, hi): x ← k·exp((x − mx)·inv_temp), k = −c·inv_temp/sum, i.e. the
// −c·softmax/τ part of the gradient. Returns the sum of what it wrote (blocked, as in tile_stats)
// so the target's entry can be set to minus the rest: see set_target.
template <typename T>
double range_grad(T* x, int64_t lo, int64_t hi, float mx, float inv_temp, float k) {
  const vf m = splat(mx), floor = splat(kExpFloor);
  double total = 0.0;
  int64_t i = lo;
  while (i + kW <= hi) {
    vf acc{};
    const int64_t stop = std::min(hi - kW, i + kTile - kW);
    for (; i <= stop; i += kW) {
      const vf g = k * exp_nonpos(floor_keep_nan((load(x + i) - m) * inv_temp, floor));
      store(x + i, g);
      acc += g;
    }
    total += hsum(acc);
  }
  if (i < hi) {
    const vf d = floor_keep_nan((load_tail(x + i, hi - i, kNegInf) - m) * inv_temp, floor);
    const vf g = k * exp_nonpos(d);  // padded lanes give 0
    store_tail(x + i, hi - i, g);
    total += hsum(g);
  }
  return total;
}

// ---- per-row loss ------------------------------------------------------------------------------

struct RowParams {
  bool sft;
  double adv, scale;
  std::optional<double> old;  // none: on-policy, old = log p itself, so the ratio is exactly 1
  std::optional<double> ref;
  double inv_temp;            // 1/τ on RL rows, 1 on SFT rows (plain cross-entropy)
};
struct Hyper {
  double beta, eps_low, eps_high, inv_temp;
};
struct RowResult {
  double loss = 0, logp = 0, entropy = 0, k3 = 0;
  bool clipped = false;
  double c = 0;  // scale · dL/dlog p
};

// Everything after the sweep is O(1) per row, so it runs in double.
RowResult finalize(const Stats& st, double x_target, const RowParams& p, const Hyper& h) {
  RowResult r;
  const double log_sum = std::log(st.sum);
  r.logp = (x_target - double(st.mx)) * p.inv_temp - log_sum;
  r.entropy = log_sum - st.dsum / st.sum;
  const double ratio = p.old ? std::exp(r.logp - *p.old) : 1.0;
  r.clipped = (p.adv > 0 && ratio > 1.0 + h.eps_high) || (p.adv < 0 && ratio < 1.0 - h.eps_low);
  double dl_dlogp = 0.0, loss = 0.0;
  if (p.ref) {  // k3 is reported for every valid row, as rowwise_loss_reference does
    const double delta = *p.ref - r.logp;
    r.k3 = std::exp(delta) - delta - 1.0;
  }
  if (p.sft) {
    loss = -r.logp;
    dl_dlogp = -1.0;
  } else {
    const double unclipped = ratio * p.adv;
    const double clip_val = std::clamp(ratio, 1.0 - h.eps_low, 1.0 + h.eps_high) * p.adv;
    loss = -std::min(unclipped, clip_val);
    // min picks the unclipped branch (ties included: there both branches have gradient A·r);
    // written so that a NaN ratio or advantage gives a NaN slope, not the clipped branch's 0
    dl_dlogp = clip_val < unclipped ? 0.0 : -p.adv * ratio;
    if (p.ref) {
      loss += h.beta * r.k3;
      dl_dlogp += h.beta * (1.0 - std::exp(*p.ref - r.logp));
    }
  }
  r.loss = p.scale * loss;
  r.c = p.scale * dl_dlogp;
  return r;
}

// c = 0 zeroes the gradient row only when the softmax is finite: with NaN statistics the
// reference's gradient is 0·NaN = NaN, and so is ours (the sweep writes k = −c/sum = NaN).
inline bool zero_grad_row(const RowResult& r, const Stats& st) {
  return r.c == 0.0 && std::isfinite(st.sum);
}

// The target's gradient is c·(1 − p_y)/τ = −Σ_{v≠y} grad_v (each gradient row sums to zero).
// Summing the other entries keeps it accurate when p_y ≈ 1, where both c/τ − c·p_y/τ and
// −expm1(log p_y) would lose 1 − p_y to the fp32 rounding of p_y or of the sum. The sweep is run
// with x[y] = −inf (hide_target), so it writes 0 there and `others` excludes the target.
template <typename T>
void hide_target(T* x, int64_t y) {
  x[y] = static_cast<T>(kNegInf);
}
template <typename T>
void set_target(T* x, int64_t y, double others) {
  x[y] = static_cast<T>(-others);
}

struct Inputs {
  const int64_t* targets;
  const bool* is_sft;
  const float *adv, *old, *ref, *scale;
  int64_t C, V;
  bool with_grad;
};
struct Outputs {
  float *loss, *logp, *entropy, *k3;
  bool* clipped;
};

RowParams row_params(const Inputs& in, const Hyper& h, int64_t i) {
  RowParams p{in.is_sft[i], in.adv[i], in.scale[i], std::nullopt, std::nullopt,
              in.is_sft[i] ? 1.0 : h.inv_temp};
  if (in.old) p.old = in.old[i];
  if (in.ref) p.ref = in.ref[i];
  return p;
}

void write_row(const Outputs& out, int64_t i, const RowResult& r) {
  out.loss[i] = static_cast<float>(r.loss);
  out.logp[i] = static_cast<float>(r.logp);
  out.entropy[i] = static_cast<float>(r.entropy);
  out.k3[i] = static_cast<float>(r.k3);
  out.clipped[i] = r.clipped;
}

// Both sweeps of one row back to back: a 600 KB fp32 row still sits in L2 for the second sweep.
template <typename T>
void process_row(T* x, const Inputs& in, const Outputs& out, const Hyper& h, int64_t i) {
  const int64_t y = in.targets[i];
  if (y < 0) {  // ignored row: outputs stay zero
    if (in.with_grad) std::memset(x, 0, sizeof(T) * in.V);
    return;
  }
  const RowParams p = row_params(in, h, i);
  const Stats st = range_stats(x, 0, in.V, p.inv_temp);
  const RowResult r = finalize(st, static_cast<float>(x[y]), p, h);
  write_row(out, i, r);
  if (!in.with_grad) return;
  if (zero_grad_row(r, st)) {  // clipped RL row without KL: zero gradient, skip the exps
    std::memset(x, 0, sizeof(T) * in.V);
    return;
  }
  const float k = static_cast<float>(-r.c * p.inv_temp / st.sum);
  hide_target(x, y);
  set_target(x, y, range_grad(x, 0, in.V, st.mx, static_cast<float>(p.inv_temp), k));
}

// Enough rows for every thread: rows are independent, dynamic schedule absorbs the cheap
// (ignored / zero-gradient) rows.
template <typename T>
void run_by_rows(T* logits, const Inputs& in, const Outputs& out, const Hyper& h, int nt) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < in.C; ++i) process_row(logits + i * in.V, in, out, h, i);
}

// Fewer rows than threads (e.g. a last chunk of 1 row): split each row into nseg segments of
// whole vectors, compute segment statistics in parallel, merge them serially (O(C·nseg)), then
// sweep the gradient per segment in parallel.
template <typename T>
void run_by_segments(T* logits, const Inputs& in, const Outputs& out, const Hyper& h, int nt) {
  const int64_t nseg = nt, C = in.C, V = in.V;
  const int64_t seg = ((V + nseg - 1) / nseg + kW - 1) / kW * kW;
  std::vector<Stats> parts(C * nseg);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < C * nseg; ++t) {
    const int64_t i = t / nseg, lo = std::min(V, (t % nseg) * seg), hi = std::min(V, lo + seg);
    if (in.targets[i] >= 0) parts[t] = range_stats(logits + i * V, lo, hi, row_params(in, h, i).inv_temp);
  }
  std::vector<Stats> rows(C);
  std::vector<RowResult> res(C);
  for (int64_t i = 0; i < C; ++i) {
    if (in.targets[i] < 0) continue;
    const RowParams p = row_params(in, h, i);
    for (int64_t s = 0; s < nseg; ++s) rows[i] = merge(rows[i], parts[i * nseg + s], p.inv_temp);
    res[i] = finalize(rows[i], static_cast<float>(logits[i * V + in.targets[i]]), p, h);
    write_row(out, i, res[i]);
  }
  if (!in.with_grad) return;
  std::vector<double> written(C * nseg, 0.0);
  for (int64_t i = 0; i < C; ++i)
    if (in.targets[i] >= 0 && !zero_grad_row(res[i], rows[i])) hide_target(logits + i * V, in.targets[i]);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < C * nseg; ++t) {
    const int64_t i = t / nseg, lo = std::min(V, (t % nseg) * seg), hi = std::min(V, lo + seg);
    T* x = logits + i * V;
    if (in.targets[i] < 0 || zero_grad_row(res[i], rows[i])) {
      std::memset(x + lo, 0, sizeof(T) * (hi - lo));
    } else {
      const float t_i = static_cast<float>(row_params(in, h, i).inv_temp);
      const float k = static_cast<float>(-res[i].c * t_i / rows[i].sum);
      written[t] = range_grad(x, lo, hi, rows[i].mx, t_i, k);
    }
  }
  for (int64_t i = 0; i < C; ++i) {  // after the sweep: the target may lie in any segment
    if (in.targets[i] < 0 || zero_grad_row(res[i], rows[i])) continue;
    double others = 0.0;
    for (int64_t s = 0; s < nseg; ++s) others += written[i * nseg + s];
    set_target(logits + i * V, in.targets[i], others);
  }
}

// ---- argument checks ---------------------------------------------------------------------------

void check_hyper(const Hyper& h) {
  TORCH_CHECK(std::isfinite(h.inv_temp) && h.inv_temp > 0,
              "vocab_pass: inv_temp must be finite and > 0, got ", h.inv_temp);
  TORCH_CHECK(std::isfinite(h.beta), "vocab_pass: beta must be finite, got ", h.beta);
  TORCH_CHECK(h.eps_low >= 0 && h.eps_high >= 0 && std::isfinite(h.eps_low) &&
                  std::isfinite(h.eps_high),
              "vocab_pass: eps_low and eps_high must be finite and >= 0, got ", h.eps_low, ", ",
              h.eps_high);
}

template <typename T>
void dispatch(at::Tensor& logits, const Inputs& in, const Outputs& out, const Hyper& h) {
  const int nt = std::max(1, at::get_num_threads());  // honours torch.set_num_threads
  T* x = logits.data_ptr<T>();
  // Splitting rows only pays when there is a thread without a row and rows are long.
  if (in.C < nt && in.V >= 4 * kTile * nt)
    run_by_segments(x, in, out, h, nt);
  else
    run_by_rows(x, in, out, h, std::max<int64_t>(1, std::min<int64_t>(nt, in.C)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vocab_pass(
    at::Tensor logits, const at::Tensor& targets, const at::Tensor& is_sft,
    const at::Tensor& advantages, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& scale, double beta,
    double eps_low, double eps_high, double inv_temp, bool with_grad) {
  constexpr const char* who = "vocab_pass";
  check_logits(who, logits, "logits", /*allow_bf16=*/true);
  const int64_t C = logits.size(0), V = logits.size(1);
  check_row_vector(who, targets, "targets", at::kLong, C);
  check_row_vector(who, is_sft, "is_sft", at::kBool, C);
  check_row_vector(who, advantages, "advantages", at::kFloat, C);
  if (old_logp) check_row_vector(who, *old_logp, "old_logp", at::kFloat, C);
  if (ref_logp) check_row_vector(who, *ref_logp, "ref_logp", at::kFloat, C);
  check_row_vector(who, scale, "scale", at::kFloat, C);
  const Hyper h{beta, eps_low, eps_high, inv_temp};
  check_hyper(h);
  check_targets(who, targets, V);

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor row_loss = at::zeros({C}, f32), logp = at::zeros({C}, f32),
             entropy = at::zeros({C}, f32), k3 = at::zeros({C}, f32),
             clipped = at::zeros({C}, f32.dtype(at::kBool));
  if (C == 0) return {row_loss, logp, entropy, clipped, k3};

  const Inputs in{targets.data_ptr<int64_t>(), is_sft.data_ptr<bool>(),
                  advantages.data_ptr<float>(), old_logp ? old_logp->data_ptr<float>() : nullptr,
                  ref_logp ? ref_logp->data_ptr<float>() : nullptr, scale.data_ptr<float>(),
                  C, V, with_grad};
  const Outputs out{row_loss.data_ptr<float>(), logp.data_ptr<float>(), entropy.data_ptr<float>(),
                    k3.data_ptr<float>(), clipped.data_ptr<bool>()};
  if (logits.scalar_type() == at::kFloat)
    dispatch<float>(logits, in, out, h);
  else
    dispatch<at::BFloat16>(logits, in, out, h);
  return {row_loss, logp, entropy, clipped, k3};
}

// Test hook: the vectorized exp on a float32 tensor (inputs clamped to [-88, 0]).
at::Tensor fast_exp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "fast_exp: x must be a contiguous float32 CPU tensor");
  at::Tensor y = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min<int64_t>(kW, n - i);
    const vf v = vmin(vmax(load_tail(src + i, m, 0.0f), splat(kExpFloor)), splat(0.0f));
    store_tail(dst + i, m, exp_nonpos(v));
  }
  return y;
}
