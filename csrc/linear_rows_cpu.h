// y = x @ w^T (+ b) for a few rows of x (1 <= M <= kMaxRows) on CPU: every weight row is read once and used for
// all M rows, so the weight, which is what a decode step's time goes into, streams from memory once per call.
//
// Why not oneDNN or MKL: at M = 1 oneDNN's matrix-vector product reads the weights near the machine's copy rate,
// but from M = 2 to 8 its GEMM reads them at about half that rate (and MKL's at a quarter) on the development
// VM's AMD EPYC (benchmarks/RESULTS.md), which is what a speculative verify pass (k + 1 tokens) or a small decode
// batch needs. Torch-free: pointers and sizes only; the glue (linear_rows.cpp) checks shapes and splits the
// output columns over threads.
//
// Arithmetic: fp32, each dot product summed in 8 interleaved partial sums (AVX2), added pairwise, then the tail
// in order: a different order from oneDNN's (fp32 rounding differences).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RAST_X86 1
#endif

namespace rast_kernels {
namespace cpu {

constexpr int kMaxRows = 8;

// y[m * ldy + n] = sum_k x[m * K + k] * w[n * ldw + k] (+ bias[n]) for n in [n0, n1), m < M: plain C++.
inline void linear_rows_scalar(const float* x, int M, int64_t K, const float* w, int64_t ldw, const float* bias,
                               float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * ldw;
    for (int m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * wr[k];
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

#ifdef RAST_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The AVX2 + FMA kernel for exactly M rows of x, R weight rows at a time: each 8-float block of x is loaded once
// for R weight rows (R * M accumulators + R + 1 ymm registers must fit in the 16 there are); a weight row is read
// once whatever M. Weight rows left over (n1 - n0 not a multiple of R) take the R = 1 path.
template <int M, int R>
__attribute__((target("avx2,fma"))) void linear_rows_avx2_m(const float* x, int64_t K, const float* w, int64_t ldw,
                                                           const float* bias, float* y, int64_t ldy, int64_t n0,
                                                           int64_t n1) {
  const int64_t kv = K / 8 * 8;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[R][M];  // (the loops over r and m are unrolled, so these live in registers)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + (n + r) * ldw + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* wr = w + (n + r) * ldw;
      for (int m = 0; m < M; ++m) {
        float s = hsum256(acc[r][m]);
        for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * wr[k];
        y[m * ldy + n + r] = s + (bias ? bias[n + r] : 0.f);
      }
    }
  }
  if (R > 1 && n < n1) linear_rows_avx2_m<M, 1>(x, K, w, ldw, bias, y, ldy, n, n1);
}

inline bool has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// Dispatch on M (1..kMaxRows) and the CPU: the AVX2 + FMA kernel where the CPU has them, else plain C++.
inline void linear_rows(const float* x, int M, int64_t K, const float* w, int64_t ldw, const float* bias, float* y,
                        int64_t ldy, int64_t n0, int64_t n1) {
#ifdef RAST_X86
  if (has_avx2_fma()) {
    switch (M) {
      case 1: return linear_rows_avx2_m<1, 4>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 2: return linear_rows_avx2_m<2, 4>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 3: return linear_rows_avx2_m<3, 3>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 4: return linear_rows_avx2_m<4, 2>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 5: return linear_rows_avx2_m<5, 2>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 6: return linear_rows_avx2_m<6, 2>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 7: return linear_rows_avx2_m<7, 1>(x, K, w, ldw, bias, y, ldy, n0, n1);
      case 8: return linear_rows_avx2_m<8, 1>(x, K, w, ldw, bias, y, ldy, n0, n1);
      default: break;
    }
  }
#endif
  linear_rows_scalar(x, M, K, w, ldw, bias, y, ldy, n0, n1);
}

}  // namespace cpu
}  // namespace rast_kernels
