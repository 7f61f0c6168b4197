// Torch-free C++17 CPU kernel of rast_sample: Philox4x32-10, the Exp(1) variate, one row's sampling.
//
// Semantics are those of rast_kernels/ops/rast_sample.py (module docstring) and the PyTorch reference
// rast_kernels/ops/rast_sample_reference.py; the generator is rast_kernels/ops/philox.py, bit for bit.
// Compile this with -ffp-contract=off: the combination and the Exp(1) formula must round after every
// operation exactly like the reference's separate tensor ops (no fused multiply-add).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

// philox4x32_10 is also compiled for the GPU by rast_sample_cuda.cu
#ifdef __CUDACC__
#define RAST_HOST_DEVICE __host__ __device__
#else
#define RAST_HOST_DEVICE
#endif

namespace rast_kernels {
namespace cpu {

// ---------------------------------------------------------------- Philox4x32-10 (Random123 layout)
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The four output words for counter (c0, c1, c2, c3) and key (k0, k1).
RAST_HOST_DEVICE inline void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                          uint32_t out[4]) {
  for (int r = 0; r < 10; ++r) {
    if (r) {  // the key is bumped before every round but the first
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Key/counter of one row: key = seed bits, counter = (column >> 2, offset lo, offset hi, 0);
// column c uses output word c & 3.
struct PhiloxRow {
  uint32_t k0, k1, c1, c2;
  PhiloxRow(int64_t seed, int64_t offset) {
    const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
    k0 = static_cast<uint32_t>(s);
    k1 = static_cast<uint32_t>(s >> 32);
    c1 = static_cast<uint32_t>(o);
    c2 = static_cast<uint32_t>(o >> 32);
  }
  // words of columns 4*group .. 4*group+3
  void group_words(uint64_t group, uint32_t out[4]) const {
    philox4x32_10(static_cast<uint32_t>(group), c1, c2, 0u, k0, k1, out);
  }
  // words of the groups g0 .. g0+count-1 (count <= kMax) into out[lane][group - g0]; the rounds run
  // across the groups so the compiler can vectorise the 32x32->64-bit products
  template <int64_t kMax>
  void block_words(uint64_t g0, int64_t count, uint32_t (&out)[4][kMax]) const {
    uint32_t* x0 = out[0];
    uint32_t* x1 = out[1];
    uint32_t* x2 = out[2];
    uint32_t* x3 = out[3];
    for (int64_t j = 0; j < count; ++j) {
      x0[j] = static_cast<uint32_t>(g0 + static_cast<uint64_t>(j));
      x1[j] = c1;
      x2[j] = c2;
      x3[j] = 0u;
    }
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        ka += kPhiloxW0;
        kb += kPhiloxW1;
      }
      for (int64_t j = 0; j < count; ++j) {
        const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * x0[j];
        const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * x2[j];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[j] ^ ka;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[j] ^ kb;
        x1[j] = static_cast<uint32_t>(p1);
        x3[j] = static_cast<uint32_t>(p0);
        x0[j] = n0;
        x2[j] = n2;
      }
    }
  }
  uint32_t word(int64_t column) const {
    uint32_t w[4];
    group_words(static_cast<uint64_t>(column) >> 2, w);
    return w[column & 3];
  }
};

// Exp(1) variate from a 32-bit word, the fp32 formula of philox.exponential_from_words:
// w = min(x * 2^-32 + 2^-33, 1 - 2^-24); E = series(w) if w < 2^-7 else -log(1 - w).
inline float exponential_from_word(uint32_t x) {
  float w = static_cast<float>(x) * 0x1p-32f;
  w = w + 0x1p-33f;
  w = std::min(w, 1.0f - 0x1p-24f);
  if (w < 0x1p-7f) {
    const float third = static_cast<float>(1.0 / 3.0);
    float t = w * 0.25f;
    t = third + t;
    t = w * t;
    t = 0.5f + t;
    t = w * t;
    t = 1.0f + t;
    return w * t;
  }
  const float one_minus = 1.0f - w;
  return -std::log(one_minus);
}

// Index of the highest set bit of x > 0 (floor(log2 x)).
inline int highest_bit(uint32_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return 31 - __builtin_clz(x);
#else
  int b = 0;
  while (x >>= 1) ++b;
  return b;
#endif
}

// Largest possible -log(E): E is smallest for the word 0. A column with z' + this below the best race
// value so far can never win the race.
inline float max_neg_log_exponential() { return -std::log(exponential_from_word(0u)); }

// ---------------------------------------------------------------- half-precision loads
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

struct F32 {
  using storage = float;
  static float load(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
};
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
      const float f = static_cast<float>(mant) * 0x1p-24f;
      return sign ? -f : f;
    }
    return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));  // rebias 15 -> 127
  }
};

// ---------------------------------------------------------------- one row
struct RowParams {
  float temperature, top_p, min_p;
  int64_t top_k, seed, offset;
};

struct RowResult {
  int64_t token;
  float logprob;
};

// Scratch reused across the rows one thread handles.
struct Workspace {
  std::vector<float> z;                        // combined, then temperature-scaled logits of the row
  std::vector<float> vals;                     // top-k: heap of the k largest, or all finite values
  std::vector<std::pair<float, float>> cands, cands2;  // (value, weight) of top-p candidates
  std::vector<double> bucket_mass;
};

constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool params_valid(const RowParams& p) {
  // a temperature must be finite: +inf (or NaN) is a bad parameter value, as on the host
  return p.temperature >= 0 && p.temperature < kInf && p.top_k >= 0 && p.top_p > 0 && p.top_p <= 1 && p.min_p >= 0 && p.min_p <= 1;
}

// Smallest value of the top-p set among the finite values z' >= tau (Hugging Face order: after top-k).
// A value v is kept when the kept mass strictly above it is < p * S, with weights exp(v - zmax) (fp32,
// as the reference) summed in double. Exact up to the reference's own fp32 rounding of the masses.
inline float top_p_threshold(const float* z, int64_t n, float zmax, float tau, float p, Workspace& ws) {
  using Item = std::pair<float, float>;  // (value, weight)
  auto& items = ws.cands;
  items.clear();
  double total = 0.0;
  int64_t count = 0;  // |kept so far|
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i];
    if (v >= tau && v > -kInf) {
      ++count;
      // weights below e^-88 (fp32 underflow range) add < 1e-29 relative to S >= 1 and, being far below
      // the candidate bound below, are never kept: skip their exp
      const float d = v - zmax;
      if (d < -88.0f) continue;
      const float w = std::exp(d);
      items.emplace_back(v, w);
      total += static_cast<double>(w);
    }
  }
  const double target = static_cast<double>(p) * total;
  // A value of weight w <= (1-p) S / (2 count) has at most count * w <= (1-p) S / 2 of mass at or below
  // it, so more than pS strictly above it: it is dropped, and only heavier values are candidates. The
  // margin on the log keeps fp32 exp rounding from dropping a borderline candidate.
  const double wmin = 0.5 * (1.0 - static_cast<double>(p)) * total / static_cast<double>(count);
  const double lo_d = static_cast<double>(zmax) + std::log(wmin) - 1e-3;
  if (lo_d > -3.0e38) {
    const float lo = static_cast<float>(lo_d);
    items.erase(std::remove_if(items.begin(), items.end(), [lo](const Item& it) { return it.first < lo; }),
                items.end());
  }

  // Invariant: cum = mass strictly above every value in items, and cum < pS, so the largest value in
  // items is kept. Returns the last kept value of the (value-descending) walk over items.
  auto walk_sorted = [&](std::vector<Item>& its, double cum) -> float {
    std::sort(its.begin(), its.end(), [](const Item& a, const Item& b) { return a.first > b.first; });
    float last = its.front().first;
    size_t i = 0;
    while (i < its.size() && cum < target) {
      const float v = its[i].first;
      last = v;
      for (; i < its.size() && its[i].first == v; ++i) cum += static_cast<double>(its[i].second);
    }
    return last;
  };
  // Many candidates (flat logits): histogram their mass by value into buckets (the bucket index is
  // monotone in the value, so buckets are ordered and a tie group never straddles two), find the bucket
  // where the cumulative mass from the top reaches pS, and go on with that bucket alone, until few
  // candidates (or one tie group) remain.
  constexpr int kBuckets = 4096;
  auto& mass = ws.bucket_mass;
  double cum = 0.0;
  auto* cur = &items;
  auto* next = &ws.cands2;
  while (cur->size() > 2048) {
    float hi = -kInf, lo = kInf;
    for (const Item& it : *cur) {
      hi = std::max(hi, it.first);
      lo = std::min(lo, it.first);
    }
    if (hi == lo) return hi;  // one tie group, kept by the invariant
    const double scale = kBuckets / (static_cast<double>(hi) - static_cast<double>(lo));
    auto bucket_of = [&](float v) -> int {
      const double f = (static_cast<double>(hi) - static_cast<double>(v)) * scale;
      return f >= kBuckets - 1 ? kBuckets - 1 : static_cast<int>(f);
    };
    mass.assign(kBuckets, 0.0);
    for (const Item& it : *cur) mass[bucket_of(it.first)] += static_cast<double>(it.second);
    int hit = -1;
    for (int j = 0; j < kBuckets; ++j) {
      if (cum + mass[j] >= target) {
        hit = j;
        break;
      }
      cum += mass[j];
    }
    if (hit < 0) return lo;  // rounding left the mass just short of pS: all of these are kept
    next->clear();
    for (const Item& it : *cur)
      if (bucket_of(it.first) == hit) next->push_back(it);
    std::swap(cur, next);
  }
  return walk_sorted(*cur, cum);
}

// Sample one row whose combined logits z (n columns) are in ws.z, parameters already checked.
inline RowResult sample_combined(int64_t n, const RowParams& prm, bool want_logprob, Workspace& ws);

// ---------------------------------------------------------------- K expert pairs, base plausibility
// Columns [i0, i0 + m) of a row as fp32 into out (one dtype switch per block, so the loop vectorises).
template <class T>
inline void load_block(const void* p, int64_t i0, int64_t m, float* out) {
  const auto* src = static_cast<const typename T::storage*>(p) + i0;
  for (int64_t j = 0; j < m; ++j) out[j] = T::load(src[j]);
}

inline void load_block_any(const void* p, DType t, int64_t i0, int64_t m, float* out) {
  switch (t) {
    case DType::kBFloat16: return load_block<BF16>(p, i0, m, out);
    case DType::kFloat16: return load_block<F16>(p, i0, m, out);
    default: return load_block<F32>(p, i0, m, out);
  }
}

struct PairInput {
  const void* expert;
  const void* expert_base;
  DType expert_dtype, expert_base_dtype;
  float alpha;
};

// Sample one row of z = base + S, S = alpha_1 (e_1 - eb_1) + ... + alpha_K (e_K - eb_K) (fp32, left to right,
// K >= 1; -inf where any input is -inf), then base plausibility (bp in [0, 1], 0 off; log_bp = fp32 log(bp) as
// computed by the caller): column i is masked unless base_i - max base >= log_bp. One pass over the 2K + 1 inputs:
// a block of columns at a time (kPairBlock, in L1), the pairs loop inside the block loop, each input converted to
// fp32 by a loop of one dtype (vectorised); with bp > 0 one more pass over base first for its max.
constexpr int64_t kPairBlock = 512;

inline RowResult sample_row_pairs(const void* base, DType base_dtype, const PairInput* pairs, int num_pairs,
                                  int64_t n, const RowParams& prm, float bp, float log_bp, bool want_logprob,
                                  Workspace& ws) {
  const RowResult bad{-1, std::numeric_limits<float>::quiet_NaN()};
  if (!params_valid(prm) || !(bp >= 0.0f && bp <= 1.0f)) return bad;
  const bool plaus = bp > 0.0f;
  float vb[kPairBlock], ve[kPairBlock], veb[kPairBlock], s[kPairBlock];
  bool masked[kPairBlock];
  float bmax = -kInf;
  if (plaus) {
    bool nonfinite = false;
    for (int64_t i0 = 0; i0 < n; i0 += kPairBlock) {
      const int64_t m = std::min(kPairBlock, n - i0);
      load_block_any(base, base_dtype, i0, m, vb);
      for (int64_t j = 0; j < m; ++j) {
        nonfinite |= !(vb[j] < kInf);
        bmax = vb[j] > bmax ? vb[j] : bmax;
      }
    }
    if (nonfinite) return bad;
  }
  ws.z.resize(static_cast<size_t>(n));
  float* z = ws.z.data();
  bool nonfinite = false;
  for (int64_t i0 = 0; i0 < n; i0 += kPairBlock) {
    const int64_t m = std::min(kPairBlock, n - i0);
    load_block_any(base, base_dtype, i0, m, vb);
    for (int64_t j = 0; j < m; ++j) masked[j] = vb[j] == -kInf;
    for (int k = 0; k < num_pairs; ++k) {
      const PairInput& q = pairs[k];
      load_block_any(q.expert, q.expert_dtype, i0, m, ve);
      load_block_any(q.expert_base, q.expert_base_dtype, i0, m, veb);
      const float a = q.alpha;
      if (k == 0) {
        for (int64_t j = 0; j < m; ++j) {
          masked[j] |= (ve[j] == -kInf) | (veb[j] == -kInf);
          s[j] = a * (ve[j] - veb[j]);
        }
      } else {
        for (int64_t j = 0; j < m; ++j) {
          masked[j] |= (ve[j] == -kInf) | (veb[j] == -kInf);
          s[j] = s[j] + a * (ve[j] - veb[j]);  // (the product rounds first: no fused multiply-add, as the spec)
        }
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      const float v = vb[j] + s[j];
      nonfinite |= !masked[j] && !(v < kInf);  // NaN or +inf in the combination, judged before plausibility
      const bool implausible = plaus && !(vb[j] - bmax >= log_bp);
      z[i0 + j] = masked[j] || implausible ? -kInf : v;
    }
  }
  if (nonfinite) return bad;
  return sample_combined(n, prm, want_logprob, ws);
}

inline RowResult sample_combined(int64_t n, const RowParams& prm, bool want_logprob, Workspace& ws) {
  const RowResult bad{-1, std::numeric_limits<float>::quiet_NaN()};
  float* z = ws.z.data();
  // bad row (NaN or +inf anywhere, or nothing unmasked); the first maximum is the greedy token
  bool nonfinite = false;
  float zmax = -kInf;
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i];
    nonfinite |= !(v < kInf);  // NaN or +inf
    zmax = v > zmax ? v : zmax;
  }
  if (nonfinite || zmax == -kInf) return bad;
  int64_t argmax = 0;
  while (z[argmax] != zmax) ++argmax;
  const float t = prm.temperature;
  if (t == 0.0f) return RowResult{argmax, 0.0f};

  // z' = z / t (division rounds like the reference's); masked columns stay -inf (also for t = inf)
  int64_t finite = 0;
  if (t != 1.0f) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = z[i];
      const float q = v / t;
      z[i] = v == -kInf ? -kInf : q;
      finite += q > -kInf;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) finite += z[i] > -kInf;
  }
  const float zs_max = z[argmax];  // division by t > 0 keeps the order, so this is max z'
  if (!(zs_max > -kInf) || zs_max == kInf) {
    // z / t overflowed (t below ~1e-38 times the logits): the distribution is the greedy limit
    return RowResult{argmax, 0.0f};
  }

  // The kept set is an upper set of values {z' >= tau} (each filter keeps everything above what it
  // keeps), further cut by min-p; tau starts at "all finite".
  float tau = -std::numeric_limits<float>::max();
  if (prm.top_k > 0 && prm.top_k < finite) {
    // fewer than k values strictly above v  <=>  v >= the k-th largest value (counted with repeats)
    const int64_t k = prm.top_k;
    auto& vals = ws.vals;
    vals.clear();
    if (k <= 4096) {
      // min-heap of the k largest so far: one compare per column, few heap updates on a random order
      const auto later = [](float a, float b) { return a > b; };
      int64_t i = 0;
      for (; i < n && static_cast<int64_t>(vals.size()) < k; ++i)
        if (z[i] > -kInf) vals.push_back(z[i]);
      std::make_heap(vals.begin(), vals.end(), later);
      for (; i < n; ++i) {
        const float v = z[i];
        if (v > vals.front()) {
          std::pop_heap(vals.begin(), vals.end(), later);
          vals.back() = v;
          std::push_heap(vals.begin(), vals.end(), later);
        }
      }
      tau = vals.front();
    } else {
      for (int64_t i = 0; i < n; ++i)
        if (z[i] > -kInf) vals.push_back(z[i]);
      const auto kth = vals.begin() + (k - 1);
      std::nth_element(vals.begin(), kth, vals.end(), [](float a, float b) { return a > b; });
      tau = *kth;
    }
  }
  if (prm.top_p < 1.0f) tau = std::max(tau, top_p_threshold(z, n, zs_max, tau, prm.top_p, ws));
  // min-p: keep exp(z' - max) >= min_p (fp32, as the reference); exp is only evaluated near the cut
  const float mp = prm.min_p;
  const bool use_min_p = mp > 0.0f;
  const float log_mp = use_min_p ? std::log(mp) : 0.0f;
  auto kept = [&](float v) -> bool {
    if (!(v >= tau) || v == -kInf) return false;
    if (!use_min_p) return true;
    const float d = v - zs_max;
    if (d > log_mp + 1e-3f) return true;
    if (d < log_mp - 1e-3f) return false;
    return std::exp(d) >= mp;
  };

  // Exponential race: argmax over kept of z' - log E (ties to the lowest id), started from the top column
  // (always kept). Exact pruning, so log E is only evaluated for columns that can still win:
  //  * a group of 4 columns all below best - max(-log E) needs no noise at all;
  //  * E >= w >= word * 2^-32 (the series and -log(1-w) are both >= w), so for a word with highest set bit
  //    L, -log E <= (32 - L) ln 2: a column whose z' plus that bound is below the best so far is skipped
  //    after only the integer generator (this leaves a handful of log evaluations per row).
  // Margins cover fp32 rounding of the race values (relative to their magnitude).
  const PhiloxRow gen(prm.seed, prm.offset);
  int64_t best = argmax;
  float best_race = zs_max - std::log(exponential_from_word(gen.word(argmax)));
  auto margin = [](float r) { return 1e-3f + 1e-6f * std::fabs(r); };
  const float reach = max_neg_log_exponential();
  const int64_t groups = (n + 3) / 4;
  constexpr int64_t kBlock = 64;  // groups of 4 columns per generator batch
  uint32_t words[4][kBlock];
  for (int64_t g0 = 0; g0 < groups; g0 += kBlock) {
    const int64_t ng = std::min(kBlock, groups - g0);
    const int64_t c_begin = 4 * g0, c_end = std::min(4 * (g0 + ng), n);
    const float cut = std::max(tau, best_race - reach - margin(best_race));
    bool any = false;
    for (int64_t c = c_begin; c < c_end; ++c) any |= z[c] >= cut;
    if (!any) continue;
    gen.block_words(static_cast<uint64_t>(g0), ng, words);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const float v = z[c];
      if (!(v >= cut)) continue;
      const uint32_t x = words[c & 3][(c >> 2) - g0];
      const float bound = x ? v + static_cast<float>(32 - highest_bit(x)) * 0.693147182f : v + reach;
      if (bound < best_race - margin(best_race) || !kept(v)) continue;
      const float r = v - std::log(exponential_from_word(x));
      if (r > best_race || (r == best_race && c < best)) {
        best_race = r;
        best = c;
      }
    }
  }
  float logprob = 0.0f;
  if (want_logprob) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (kept(z[i])) sum += static_cast<double>(std::exp(z[i] - zs_max));
    logprob = static_cast<float>(static_cast<double>(z[best]) - (static_cast<double>(zs_max) + std::log(sum)));
  }
  return RowResult{best, logprob};
}

}  // namespace cpu
}  // namespace rast_kernels
