// Native CPU kernel of the fused teacher–student distillation pass (afrl_fast.loss.fused_distill_loss).
//
// Inputs per chunk: the student's raw logits x_s = h_s·W_sᵀ and the teacher's x_t = h_t·W_tᵀ, both
// [C, V] fp32; per row a target y (−100: ignored), coef = m·w/den (the weight of D in the loss);
// ce_coef = hard_label_weight/den; τ⁻¹ = inv_temp. With a = (x_t − m_t)·τ⁻¹ and b = (x_s − m_s)·τ⁻¹
// measured from the row maxima, S_t = Σ e^a and S_s = Σ e^b, so log P = a − log S_t and
// log Q = b − log S_s:
//
//   forward_kl  D = Σ e^a·(a − b) / S_t − log S_t + log S_s     dD/du = Q − P
//   reverse_kl  D = Σ e^b·(b − a) / S_s − log S_s + log S_t     dD/du = Q·(log Q − log P − D)
//   jsd         D = β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q  dD/du = (1−β)·Q·(log Q − log M − KL(Q‖M))
//   CE          = log S1 − (x_s[y] − m_s), S1 = Σ e^{x_s − m_s}  (τ = 1: S1 = S_s)
//
// Sweep 1 is online over tiles of both rows: the max pass and the exp pass of a tile share L1, and
// tile sums are merged into the row in double with the shift rule in `merge`, so the KL cross sums
// of forward/reverse KL come out of this one sweep (as the entropy does in vocab_pass.cpp). jsd
// needs a second sweep (log M is not linear in the sums). The last sweep overwrites x_s in place
// with d loss/d x_s = coef·τ⁻¹·dD/du + ce_coef·(softmax(x_s) − onehot(y)); x_t is only read.
//
// Non-finite inputs follow the float64 reference (kernels/reference.py): a NaN or +inf logit of a
// kept row, teacher or student, makes its D NaN and its whole gradient row NaN (CE too when it is the
// student's); a −inf logit is a masked token (p = 0 adds nothing, selected as "e == 0" so a NaN e is
// never taken for 0); an ignored row gives zeros whatever its logits hold.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

#include "checks.h"
#include "passes.h"
#include "simd.h"

namespace {

using namespace afrl_simd;
using namespace afrl_checks;

enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();

// e^d for d ≤ 0 (NaN kept), exactly 0 below the floor
inline vf exp_floor(vf d) { return exp_nonpos(floor_keep_nan(d, splat(kExpFloor))); }

// ---- sweep 1: online statistics of both rows ---------------------------------------------------

struct PairStats {
  float mt = kNegInf, ms = kNegInf;  // maxima of the raw logits (−inf: no mass seen)
  double st = 0.0, ss = 0.0;         // Σ e^a, Σ e^b
  double cross = 0.0;                // Σ e^a·(a − b) (forward KL) or Σ e^b·(b − a) (reverse KL)
  double s1 = 0.0;                   // Σ e^{x_s − m_s}: the student at τ = 1 (only when τ ≠ 1)
};

// (part max − common max)·τ⁻¹; a part without mass is −inf away whatever the common max is.
inline double rel(float part, float common, double t) {
  return part == kNegInf ? kNegInfD : (double(part) - double(common)) * t;
}
// e^δ·sum, where an empty part adds 0 (never −inf·0); a NaN sum stays NaN.
inline double rescale(double sum, double delta) { return sum == 0.0 ? 0.0 : sum * std::exp(delta); }

// Moving a part to the common maxima shifts a by δt and b by δs:
//   Σ e^{a+δt}·(a + δt − b − δs) = e^{δt}·(cross + (δt − δs)·st)   (reverse KL: t ↔ s).
template <int KIND, bool SEP>
PairStats merge(const PairStats& x, const PairStats& y, double t) {
  PairStats o;
  o.mt = std::max(x.mt, y.mt);
  o.ms = std::max(x.ms, y.ms);
  for (const PairStats* p : {&x, &y}) {
    const double dt = rel(p->mt, o.mt, t), ds = rel(p->ms, o.ms, t);
    o.st += rescale(p->st, dt);
    o.ss += rescale(p->ss, ds);
    if (KIND == kForwardKL)
      o.cross += p->st == 0.0 ? p->cross : std::exp(dt) * (p->cross + (dt - ds) * p->st);
    if (KIND == kReverseKL)
      o.cross += p->ss == 0.0 ? p->cross : std::exp(ds) * (p->cross + (ds - dt) * p->ss);
    if (SEP) o.s1 += rescale(p->s1, rel(p->ms, o.ms, 1.0));
  }
  return o;
}

// One tile of both rows (≤ kTile values each, ≤ 16 KB together: in L1 between the max and the exp pass).
// Tile sums are fp32 over ≤ 64 terms per lane (two accumulator sets), folded into doubles.
template <int KIND, bool SEP>
PairStats tile_stats(const float* xs, const float* xt, int64_t n, float t) {
  const int64_t nv = n - n % kW;
  vf mvs = splat(kNegInf), mvt = splat(kNegInf);
  for (int64_t i = 0; i < nv; i += kW) {
    mvs = vmax(mvs, load(xs + i));
    mvt = vmax(mvt, load(xt + i));
  }
  if (nv < n) {
    mvs = vmax(mvs, load_tail(xs + nv, n - nv, kNegInf));
    mvt = vmax(mvt, load_tail(xt + nv, n - nv, kNegInf));
  }
  PairStats st;
  st.ms = hmax(mvs);
  st.mt = hmax(mvt);
  // A side without mass is measured from 0: its sums come out 0, or NaN if the max pass dropped one.
  const vf ms = splat(st.ms == kNegInf ? 0.0f : st.ms), mt = splat(st.mt == kNegInf ? 0.0f : st.mt);
  vf ss[2] = {}, stt[2] = {}, cr[2] = {}, s1[2] = {};
  auto step = [&](vf s, vf x, int k) {
    const vf b = (s - ms) * t, a = (x - mt) * t;
    const vf eb = exp_floor(b), ea = exp_floor(a);
    ss[k] += eb;
    stt[k] += ea;
    // a − b and b − a from the unclamped values: a student −inf under teacher mass is +inf, as it must be
    if (KIND == kForwardKL) cr[k] += ea == 0.0f ? vf{} : ea * (a - b);
    if (KIND == kReverseKL) cr[k] += eb == 0.0f ? vf{} : eb * (b - a);
    if (SEP) s1[k] += exp_floor(s - ms);
  };
  int64_t i = 0;
  for (; i + 2 * kW <= nv; i += 2 * kW) {
    step(load(xs + i), load(xt + i), 0);
    step(load(xs + i + kW), load(xt + i + kW), 1);
  }
  for (; i < n; i += kW) {  // at most one full vector plus the −inf padded tail
    const bool full = i + kW <= n;
    step(full ? load(xs + i) : load_tail(xs + i, n - i, kNegInf),
         full ? load(xt + i) : load_tail(xt + i, n - i, kNegInf), 0);
  }
  st.ss = hsum(ss[0] + ss[1]);
  st.st = hsum(stt[0] + stt[1]);
  st.cross = hsum(cr[0] + cr[1]);
  st.s1 = hsum(s1[0] + s1[1]);
  return st;
}

template <int KIND, bool SEP>
PairStats row_stats(const float* xs, const float* xt, int64_t V, double t) {
  PairStats acc;
  for (int64_t j = 0; j < V; j += kTile)
    acc = merge<KIND, SEP>(acc, tile_stats<KIND, SEP>(xs + j, xt + j, std::min(kTile, V - j),
                                                      static_cast<float>(t)), t);
  return acc;
}

// ---- the row frame and the per-token terms ----------------------------------------------------

struct Frame {
  float ms, mt, t;      // row maxima, τ⁻¹
  float lss, lst;       // log S_s, log S_t
  float beta, cbeta;    // jsd: β, 1 − β
  float lb, lcb;        // jsd: log β, log(1 − β)
};

struct JsdTerms {
  vf lq, lp, q, p, lm;
};

inline JsdTerms jsd_terms(vf s, vf x, const Frame& f) {
  const vf lq = (s - f.ms) * f.t - f.lss, lp = (x - f.mt) * f.t - f.lst;
  const vf q = exp_floor(lq), p = exp_floor(lp);
  const vf m = f.beta * p + f.cbeta * q;
  // log M from M where it is a normal float; below, the larger log term (the smaller one's share is
  // lost to the floor anyway, and its weights P, Q are < FLT_MIN/β). NaN M takes log_pos: stays NaN.
  const vf lm = m < FLT_MIN ? vmax(lp + f.lb, lq + f.lcb) : log_pos(m);
  return {lq, lp, q, p, lm};
}

// Sweep 2 of jsd: (KL(P‖M), KL(Q‖M)), blocked like the sweep-1 sums.
std::pair<double, double> jsd_sums(const float* xs, const float* xt, int64_t V, const Frame& f) {
  double klp = 0.0, klq = 0.0;
  for (int64_t j = 0; j < V; j += kTile) {
    const int64_t stop = std::min(V, j + kTile);
    vf ap{}, aq{};
    for (int64_t i = j; i < stop; i += kW) {
      const int64_t n = std::min<int64_t>(kW, stop - i);
      const JsdTerms u = jsd_terms(n == kW ? load(xs + i) : load_tail(xs + i, n, kNegInf),
                                   n == kW ? load(xt + i) : load_tail(xt + i, n, kNegInf), f);
      ap += u.p == 0.0f ? vf{} : u.p * (u.lp - u.lm);
      aq += u.q == 0.0f ? vf{} : u.q * (u.lq - u.lm);
    }
    klp += hsum(ap);
    klq += hsum(aq);
  }
  return {klp, klq};
}

// ---- the gradient sweep -----------------------------------------------------------------------

// g = coef·τ⁻¹·dD/du + ce_coef·softmax(x_s) per token (the −ce_coef at the target is set apart):
//   forward_kl  g = kq·e^b − kp·e^a                 (kq = coef·τ⁻¹/S_s, + ce_coef/S_s when τ = 1)
//   reverse_kl  g = e^b·(kq·(b − a − shift) + kc0)  (kq = coef·τ⁻¹/S_s, shift = cross/S_s = log S_s − log S_t + D)
//   jsd         g = Q·(kq·(log Q − log M − shift) + kc0)  (kq = coef·τ⁻¹·(1−β), shift = KL(Q‖M))
//   τ ≠ 1: + kc1·e^{x_s − m_s}, kc1 = ce_coef/S1
struct GradCoef {
  float kq, kp, shift, kc0, kc1;
};

template <int KIND, bool SEP, bool CE>
inline vf grad_terms(vf s, vf x, const Frame& f, const GradCoef& k) {
  vf g;
  if (KIND == kForwardKL) {
    g = k.kq * exp_floor((s - f.ms) * f.t) - k.kp * exp_floor((x - f.mt) * f.t);
  } else if (KIND == kReverseKL) {
    const vf b = (s - f.ms) * f.t, a = (x - f.mt) * f.t;
    const vf eb = exp_floor(b);
    g = eb == 0.0f ? vf{} : eb * (k.kq * (b - a - k.shift) + k.kc0);
  } else {
    const JsdTerms u = jsd_terms(s, x, f);
    g = u.q == 0.0f ? vf{} : u.q * (k.kq * (u.lq - u.lm - k.shift) + k.kc0);
  }
  if (SEP && CE) g += k.kc1 * exp_floor(s - f.ms);
  return g;
}

// Writes g over x_s[lo, hi) and returns the sum of what it wrote (fp32 per tile, double across).
template <int KIND, bool SEP, bool CE>
double grad_range(float* xs, const float* xt, int64_t lo, int64_t hi, const Frame& f, const GradCoef& k) {
  double total = 0.0;
  for (int64_t j = lo; j < hi; j += kTile) {
    const int64_t stop = std::min(hi, j + kTile);
    vf acc{};
    for (int64_t i = j; i < stop; i += kW) {
      const int64_t n = std::min<int64_t>(kW, stop - i);
      vf g;
      if (n == kW) {
        g = grad_terms<KIND, SEP, CE>(load(xs + i), load(xt + i), f, k);
        store(xs + i, g);
      } else {  // padded lanes are −inf in both rows: they write nothing and add 0
        g = grad_terms<KIND, SEP, CE>(load_tail(xs + i, n, kNegInf), load_tail(xt + i, n, kNegInf), f, k);
        store_tail(xs + i, n, g);
      }
      acc += g;
    }
    total += hsum(acc);
  }
  return total;
}

// ---- per row ----------------------------------------------------------------------------------

struct Inputs {
  const int64_t* targets;
  const float* coef;
  double ce_coef, beta, inv_temp;
  int64_t C, V;
  bool with_grad;
};
struct Outputs {
  float *div, *ce;
};

// The target's entry has two estimates. Every gradient row sums to 0 (dD/du and softmax − onehot
// both do), so it is −Σ of the others, which carries the rounding of the others' terms,
// ~ε·(|coef|·τ⁻¹·(2 − P_y − Q_y) + ce_coef·(1 − q_y)) (their probabilities sum to 1 − P_y etc.);
// or it is its own terms minus ce_coef, ~ε·(|coef|·τ⁻¹·max(P_y, Q_y) + ce_coef·(1 + q_y)), q the
// student's softmax at τ = 1. The smaller bound wins: where the target holds most of the mass the
// sum keeps 1 − p_y, which ce_coef·(p_y − 1) or P_y − Q_y lose in fp32; a low-probability target
// is an ordinary entry, which the others' rounding would swamp. An infinite D (one-sided −inf)
// makes the sum non-finite: then the direct formula, as the reference forms it.
template <int KIND, bool SEP, bool CE>
void write_grad(float* xs, const float* xt, int64_t V, int64_t y, const Frame& f, const GradCoef& k,
                bool prefer_sum, double ce_coef) {
  const double others = grad_range<KIND, SEP, CE>(xs, xt, 0, y, f, k) +
                        grad_range<KIND, SEP, CE>(xs, xt, y + 1, V, f, k);
  if (prefer_sum && std::isfinite(others)) {
    xs[y] = static_cast<float>(-others);
  } else {
    grad_range<KIND, SEP, CE>(xs, xt, y, y + 1, f, k);  // the target's own terms, as any entry's
    xs[y] = static_cast<float>(xs[y] - ce_coef);
  }
}

template <int KIND, bool SEP>
void process_row(float* xs, const float* xt, const Inputs& in, const Outputs& out, int64_t i) {
  const int64_t y = in.targets[i], V = in.V;
  if (y < 0) {  // ignored row: outputs stay zero
    if (in.with_grad) std::memset(xs, 0, sizeof(float) * V);
    return;
  }
  const double t = in.inv_temp;
  const PairStats st = row_stats<KIND, SEP>(xs, xt, V, t);
  // A row with no finite softmax (NaN or +inf logits, or all −inf) has NaN statistics or a zero sum.
  const bool t_ok = st.st > 0.0 && std::isfinite(st.st), s_ok = st.ss > 0.0 && std::isfinite(st.ss);
  const double lst = std::log(st.st), lss = std::log(st.ss);
  const double beta = in.beta;
  const Frame f{st.ms, st.mt, static_cast<float>(t), static_cast<float>(lss), static_cast<float>(lst),
                static_cast<float>(beta), static_cast<float>(1.0 - beta),
                static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
  double d = kNaN, shift = 0.0;
  if (t_ok && s_ok) {
    if (KIND == kForwardKL) d = st.cross / st.st - lst + lss;
    if (KIND == kReverseKL) d = st.cross / st.ss - lss + lst;
    if (KIND == kJSD) {
      const auto [klp, klq] = jsd_sums(xs, xt, V, f);
      d = beta * klp + (1.0 - beta) * klq;
      shift = klq;
    }
  }
  const double x_y = xs[y];
  const double ce = s_ok ? (SEP ? std::log(st.s1) - (x_y - st.ms) : lss - (x_y - st.ms) * t) : kNaN;
  out.div[i] = static_cast<float>(d);
  out.ce[i] = static_cast<float>(ce);
  if (!in.with_grad) return;
  if (std::isnan(d)) {  // the reference's gradient row is NaN throughout
    std::fill(xs, xs + V, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const double cd = in.coef[i] * t, cc = in.ce_coef;
  if (cd == 0.0 && cc == 0.0 && std::isfinite(d)) {  // weight 0, no hard label: skip the exps
    std::memset(xs, 0, sizeof(float) * V);
    return;
  }
  if (KIND == kReverseKL) shift = st.cross / st.ss;
  GradCoef k{};
  if (KIND == kForwardKL) {
    k.kq = static_cast<float>((cd + (SEP ? 0.0 : cc)) / st.ss);
    k.kp = static_cast<float>(cd / st.st);
  } else if (KIND == kReverseKL) {
    k.kq = static_cast<float>(cd / st.ss);
    k.kc0 = static_cast<float>(SEP ? 0.0 : cc / st.ss);
  } else {
    k.kq = static_cast<float>(cd * (1.0 - beta));
    k.kc0 = static_cast<float>(SEP ? 0.0 : cc);
  }
  k.shift = static_cast<float>(shift);
  k.kc1 = static_cast<float>(SEP ? cc / st.s1 : 0.0);
  const double p_y = std::exp((double(xt[y]) - st.mt) * t - lst), q_y = std::exp((x_y - st.ms) * t - lss);
  const double q1_y = SEP ? std::exp(x_y - st.ms - std::log(st.s1)) : q_y;
  const bool prefer_sum = std::abs(cd) * (2.0 - p_y - q_y) + cc * (1.0 - q1_y) <
                          std::abs(cd) * std::max(p_y, q_y) + cc * (1.0 + q1_y);
  if (cc != 0.0)
    write_grad<KIND, SEP, true>(xs, xt, V, y, f, k, prefer_sum, cc);
  else
    write_grad<KIND, SEP, false>(xs, xt, V, y, f, k, prefer_sum, cc);
}

template <int KIND, bool SEP>
void run_rows(float* xs, const float* xt, const Inputs& in, const Outputs& out) {
  // Rows are independent; the dynamic schedule absorbs cheap (ignored / zero-weight) rows.
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), in.C)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < in.C; ++i) process_row<KIND, SEP>(xs + i * in.V, xt + i * in.V, in, out, i);
}

template <int KIND>
void run_kind(float* xs, const float* xt, const Inputs& in, const Outputs& out) {
  if (in.inv_temp == 1.0)
    run_rows<KIND, false>(xs, xt, in, out);
  else
    run_rows<KIND, true>(xs, xt, in, out);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_pass(at::Tensor student_logits,
                                                const at::Tensor& teacher_logits,
                                                const at::Tensor& targets, const at::Tensor& coef,
                                                double ce_coef, int64_t kind, double beta,
                                                double inv_temp, bool with_grad) {
  constexpr const char* who = "distill_pass";
  check_logits(who, student_logits, "student_logits", /*allow_bf16=*/false);
  check_logits(who, teacher_logits, "teacher_logits", /*allow_bf16=*/false);
  TORCH_CHECK(teacher_logits.sizes() == student_logits.sizes(), who,
              ": teacher_logits must have the shape of student_logits ", student_logits.sizes(),
              ", got ", teacher_logits.sizes());
  const int64_t C = student_logits.size(0), V = student_logits.size(1);
  check_row_vector(who, targets, "targets", at::kLong, C);
  check_row_vector(who, coef, "coef", at::kFloat, C);
  TORCH_CHECK(kind >= kForwardKL && kind <= kJSD, who,
              ": kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(kind != kJSD || (beta > 0.0 && beta < 1.0), who,
              ": beta must be in (0, 1) for jsd, got ", beta);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0.0, who,
              ": inv_temp must be finite and > 0, got ", inv_temp);
  TORCH_CHECK(std::isfinite(ce_coef), who, ": ce_coef must be finite, got ", ce_coef);
  check_targets(who, targets, V);

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor div = at::zeros({C}, f32), ce = at::zeros({C}, f32);
  if (C == 0) return {div, ce};
  const Inputs in{targets.data_ptr<int64_t>(), coef.data_ptr<float>(), ce_coef, beta, inv_temp, C, V,
                  with_grad};
  const Outputs out{div.data_ptr<float>(), ce.data_ptr<float>()};
  float* xs = student_logits.data_ptr<float>();
  const float* xt = teacher_logits.data_ptr<float>();
  if (kind == kForwardKL)
    run_kind<kForwardKL>(xs, xt, in, out);
  else if (kind == kReverseKL)
    run_kind<kReverseKL>(xs, xt, in, out);
  else
    run_kind<kJSD>(xs, xt, in, out);
  return {div, ce};
}

// Test hook: the vectorized log on a float32 tensor (normal positive inputs, +inf and NaN).
at::Tensor fast_log(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "fast_log: x must be a contiguous float32 CPU tensor");
  at::Tensor y = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min<int64_t>(kW, n - i);
    store_tail(dst + i, m, log_pos(load_tail(src + i, m, 1.0f)));
  }
  return y;
}
