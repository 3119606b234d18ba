// bf16 matrix-vector products for a few rows (decode steps), called through ctypes from hearth/kernels/bf16_cpu.py.
//
// bf16_gemv: out[m, n] = bf16(sum_k x[m, k] * W[n, k] + bias[n]) with x, W, bias bf16 and W row-major [N, K] (a dense
// Linear's weight as it is), products and sums in float32 (AVX-512 BF16 vdpbf16ps: 16 lanes of pairwise dots; AVX2:
// widened to float32, fmadd), as torch's bf16 matmul does in another order. Tiles of 4 weight rows by up to 4 rows of x; threads take contiguous runs
// of rows so each streams its own part of W. Beyond 4 rows of x the dot products, not memory, bound the speed and
// torch's kernel is as fast (MAX_M in bf16_cpu.py).
#include <stdint.h>
#include <string.h>

#include "kernel_common.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define TR 4  // weight rows per tile
#define TM 4  // x rows per tile

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_TILES 1
int bf16_gemv_fast(void) { return 1; }

// one weight row against T rows of x, two accumulators each (64 values a step)
static inline __attribute__((always_inline)) void tile1(const int T, const uint16_t *w, int64_t K, const uint16_t *x,
                                                        float *acc_out) {
    __m512 a0[TM], a1[TM];
    for (int m = 0; m < T; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int m = 0; m < T; m++) {
            a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
            a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
        }
    }
    for (; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        const __m512i w0 = _mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < T; m++)
            a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < T; m++) acc_out[m * TR] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
}

// TR weight rows against T rows of x: each x load serves TR rows (for T > 2, where the dot products bound the speed)
static inline __attribute__((always_inline)) void tile4(const int T, const uint16_t *w, int64_t K, const uint16_t *x,
                                                        float *acc_out) {
    __m512 acc[TR][TM];
    for (int r = 0; r < TR; r++)
        for (int m = 0; m < T; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        __m512i xv[TM];
        for (int m = 0; m < T; m++) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        for (int r = 0; r < TR; r++) {
            const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
            for (int m = 0; m < T; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    for (int r = 0; r < TR; r++)
        for (int m = 0; m < T; m++) acc_out[m * TR + r] = _mm512_reduce_add_ps(acc[r][m]);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_TILES 1
int bf16_gemv_fast(void) { return 1; }

// AVX2 without AVX512-BF16: 8 bf16 values widened to float32 (exact), products summed with fmadd; the last values
// of a row (fewer than 8) through a zero-padded copy
static inline __m256 bf16x8_tail(const uint16_t *p, int64_t n) {
    uint16_t t[8] = {0};
    memcpy(t, p, sizeof(uint16_t) * (size_t)n);
    return load_bf16x8(t);
}

// one weight row against T rows of x, two accumulators each (16 values a step)
static inline __attribute__((always_inline)) void tile1(const int T, const uint16_t *w, int64_t K, const uint16_t *x,
                                                        float *acc_out) {
    __m256 a0[TM], a1[TM];
    for (int m = 0; m < T; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = load_bf16x8(w + k), w1 = load_bf16x8(w + k + 8);
        for (int m = 0; m < T; m++) {
            a0[m] = _mm256_fmadd_ps(w0, load_bf16x8(x + m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, load_bf16x8(x + m * K + k + 8), a1[m]);
        }
    }
    for (; k < K; k += 8) {
        const int64_t n = K - k < 8 ? K - k : 8;
        const __m256 w0 = bf16x8_tail(w + k, n);
        for (int m = 0; m < T; m++) a0[m] = _mm256_fmadd_ps(w0, bf16x8_tail(x + m * K + k, n), a0[m]);
    }
    for (int m = 0; m < T; m++) acc_out[m * TR] = hsum8(_mm256_add_ps(a0[m], a1[m]));
}

// TR weight rows against T rows of x: each x load serves TR rows (for T > 2, where the dot products bound the speed)
static inline __attribute__((always_inline)) void tile4(const int T, const uint16_t *w, int64_t K, const uint16_t *x,
                                                        float *acc_out) {
    __m256 acc[TR][TM];
    for (int r = 0; r < TR; r++)
        for (int m = 0; m < T; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const int64_t n = K - k < 8 ? K - k : 8;
        __m256 xv[TM];
        for (int m = 0; m < T; m++) xv[m] = n == 8 ? load_bf16x8(x + m * K + k) : bf16x8_tail(x + m * K + k, n);
        for (int r = 0; r < TR; r++) {
            const __m256 wv = n == 8 ? load_bf16x8(w + r * K + k) : bf16x8_tail(w + r * K + k, n);
            for (int m = 0; m < T; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < TR; r++)
        for (int m = 0; m < T; m++) acc_out[m * TR + r] = hsum8(acc[r][m]);
}

#endif

#ifdef HAVE_TILES
// Rows one at a time read W as one contiguous stream, fastest while memory bounds the speed (T <= 2)
static void rows_tile(int R, int T, const uint16_t *w, int64_t K, const uint16_t *x, float *acc) {
    if (R == TR && T == 4) tile4(4, w, K, x, acc);
    else if (R == TR && T == 3) tile4(3, w, K, x, acc);
    else
        for (int r = 0; r < R; r++) {
            if (T == 1) tile1(1, w + r * K, K, x, acc + r);
            else if (T == 2) tile1(2, w + r * K, K, x, acc + r);
            else if (T == 3) tile1(3, w + r * K, K, x, acc + r);
            else tile1(4, w + r * K, K, x, acc + r);
        }
}
#else
int bf16_gemv_fast(void) { return 0; }

static void rows_tile(int R, int T, const uint16_t *w, int64_t K, const uint16_t *x, float *acc) {
    for (int r = 0; r < R; r++)
        for (int m = 0; m < T; m++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bf16_to_float(w[r * K + k]) * bf16_to_float(x[m * K + k]);
            acc[m * TR + r] = s;
        }
}
#endif

// weight rows [n0, n0 + TR) of W [N, K] against all M rows of x: out[m, n] = bf16(x[m] . W[n] + bias[n])
static inline void gemv_rows(int64_t M, int64_t N, int64_t K, const uint16_t *x, const uint16_t *w,
                             const uint16_t *bias, uint16_t *out, int64_t n0) {
    const int R = N - n0 < TR ? (int)(N - n0) : TR;
    for (int64_t m0 = 0; m0 < M; m0 += TM) {
        const int T = M - m0 < TM ? (int)(M - m0) : TM;
        float acc[TM * TR];
        rows_tile(R, T, w + n0 * K, K, x + m0 * K, acc);
        for (int m = 0; m < T; m++)
            for (int r = 0; r < R; r++) {
                const float b = bias ? bf16_to_float(bias[n0 + r]) : 0.0f;
                out[(m0 + m) * N + n0 + r] = float_to_bf16(acc[m * TR + r] + b);
            }
    }
}

// x [M, K], W [N, K], bias [N] or NULL, out [M, N]: all bf16, contiguous
void bf16_gemv(int64_t M, int64_t N, int64_t K, const uint16_t *x, const uint16_t *w, const uint16_t *bias,
               uint16_t *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += TR) gemv_rows(M, N, K, x, w, bias, out, n0);
}

// one product per head (MLA's absorbed decode): out[h] = x[h] W[h]^T for x [H, M, K], W [H, N, K], out [H, M, N]
void bf16_gemv_heads(int64_t H, int64_t M, int64_t N, int64_t K, const uint16_t *x, const uint16_t *w, uint16_t *out,
                     int nthreads) {
    const int64_t tiles = (N + TR - 1) / TR;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < H * tiles; i++) {
        const int64_t h = i / tiles;
        gemv_rows(M, N, K, x + h * M * K, w + h * N * K, NULL, out + h * M * N, (i % tiles) * TR);
    }
}
