// The R16 weight form and its int8-activation matmul, shared by gguf_cpu.c (r16_gemm, r16_dequant) and
// llama_decode.c (the fused decode step); cbuild.load_library hashes this header into each library's cache key.
//
// Weights come from GGUF Q4_0 / Q4_1 / Q8_0 blocks, repacked once at load into a row-interleaved form ("R16", the
// idea of llama.cpp's Q4_0x8 repacking): rows in groups of 16; per group and block of 32 values, the integer values
// as 64-byte chunks of 16 lanes (one per row) of 4 bytes, then the 16 rows' f16 scales d and 16 f16 offsets m.
//   Q4: 4 chunks; byte j of lane r holds value 8c+j of row r in its low nibble and value 8c+4+j in its high one.
//   Q8: 8 chunks of w+128 (unsigned); byte j of lane r is value 4c+j.
//   w = d*q + m with m = the Q4_1 min, -8d for Q4_0, -128d for Q8_0 (exact in f16). Bytes per row are the file's
//   (Q4_1) or 1/9 (Q4_0) and 1/17 (Q8_0) more.
// As in llama.cpp, activations are quantized per 32 values to int8 (xd = amax/127, xq = round(x/xd)); a 64-byte chunk
// times 4 broadcast activation bytes is one dpbusd giving 16 rows' partial dots, so a block of 16 rows costs 8 of them
// plus one scale step; `xs` = xd * sum(xq) carries the offsets.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel_common.h"

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };  // GGML type ids

#define QK 32

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f);  // subnormal (or zero): man * 2^-24
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// ---- activations -> int8 blocks ----

// Per block: q = round(x / d) with d = amax/127; d[b] and s[b] = d * sum(q).
static inline void quantize_block(const float *xb, int8_t *q, float *d, float *s, int64_t b) {
    const int sum = q8_block(xb, q, d + b);
    s[b] = d[b] * (float)sum;
}

// rows [n0, n1) of this thread's share of N (contiguous chunks, so each thread streams its own part of W)
static inline void thread_range(int64_t N, int tid, int nth, int64_t *n0, int64_t *n1) {
    int64_t per = (N + nth - 1) / nth;
    *n0 = tid * per < N ? tid * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

// ---- R16 weights ----

typedef struct {
    const uint8_t *qs;   // [G][K/32][chunk bytes]
    const uint16_t *sc;  // [G][K/32][32]: 16 f16 d, then 16 f16 m
    int64_t qtype, N, K; // qtype: the GGUF type it came from (2 Q4_0, 3 Q4_1, 8 Q8_0)
} R16;

static inline int64_t r16_chunk_bytes(const R16 *w) { return w->qtype == T_Q8_0 ? 512 : 256; }

// Quantized activations: M rows of K values (sized for the largest K they will hold).
typedef struct {
    int8_t *q;
    float *d, *s;
    int64_t K;
} QX;

static QX qx_alloc(int64_t M, int64_t kmax) {
    QX x = {malloc((size_t)(M * kmax)), malloc(sizeof(float) * (size_t)(M * kmax / QK)),
            malloc(sizeof(float) * (size_t)(M * kmax / QK)), 0};
    return x;
}

static void qx_free(QX *x) {
    free(x->q);
    free(x->d);
    free(x->s);
}

// block (m, b) of x [M, K] (row stride ldx) into the QX as a K-wide matrix
static inline void qx_block(QX *x, const float *src, int64_t ldx, int64_t K, int64_t m, int64_t b) {
    quantize_block(src + m * ldx + b * QK, x->q + m * K + b * QK, x->d + m * (K / QK), x->s + m * (K / QK), b);
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_ZMM 1
static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// Rows 16g.. of W against T rows of x (m0..): acc[i] lane r += (int dot of the block) * d_r * dx + m_r * sx
static inline __attribute__((always_inline)) void r16_tile(const int q8, const int T, const R16 *w, int64_t g,
                                                           int64_t m0, const QX *x, float *out, int64_t ldo,
                                                           int accumulate) {
    const int64_t K = w->K, nb = K / QK, cb = q8 ? 512 : 256;
    const uint8_t *qg = w->qs + g * nb * cb;
    const uint16_t *sg = w->sc + g * nb * 32;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = qg + b * cb;
        for (int c = 0; c < cb; c += 64) _mm_prefetch((const char *)(qb + 4 * cb + c), _MM_HINT_T0);
        __m512i wv[8];
        if (q8) {
            for (int c = 0; c < 8; c++) wv[c] = _mm512_loadu_si512((const void *)(qb + 64 * c));
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * c));
                wv[2 * c] = _mm512_and_si512(v, m4);
                wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        }
        const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg + b * 32)));
        const __m512 m16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg + b * 32 + 16)));
        for (int i = 0; i < T; i++) {
            const int8_t *xb = x->q + (m0 + i) * K + b * QK;
            // two independent chains: vpdpbusd's latency, not its throughput, bounded one chain of 8
            __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
            for (int c = 0; c < 8; c += 2) {
                i0 = _mm512_dpbusd_epi32(i0, wv[c], _mm512_set1_epi32(load_i32(xb + 4 * c)));
                i1 = _mm512_dpbusd_epi32(i1, wv[c + 1], _mm512_set1_epi32(load_i32(xb + 4 * c + 4)));
            }
            const __m512i iacc = _mm512_add_epi32(i0, i1);
            const int64_t xi = (m0 + i) * nb + b;
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), _mm512_mul_ps(d16, _mm512_set1_ps(x->d[xi])), acc[i]);
            acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(x->s[xi]), acc[i]);
        }
    }
    const int64_t rows = w->N - 16 * g;
    const __mmask16 mask = rows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
    for (int i = 0; i < T; i++) {
        float *o = out + (m0 + i) * ldo + 16 * g;
        const __m512 v = accumulate ? _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(mask, o)) : acc[i];
        _mm512_mask_storeu_ps(o, mask, v);
    }
}

static inline __attribute__((always_inline)) void r16_groups_t(const int q8, const R16 *w, int64_t g0, int64_t g1,
                                                               int64_t M, const QX *x, float *out, int64_t ldo,
                                                               int accumulate) {
    for (int64_t g = g0; g < g1; g++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) r16_tile(q8, 4, w, g, m0, x, out, ldo, accumulate);
        for (; m0 + 2 <= M; m0 += 2) r16_tile(q8, 2, w, g, m0, x, out, ldo, accumulate);
        if (m0 < M) r16_tile(q8, 1, w, g, m0, x, out, ldo, accumulate);
    }
}
#endif

// the integer value of row r, element k of block b of group g (0..15 for Q4, w+128 for Q8)
static inline int r16_value(const R16 *w, int64_t g, int64_t b, int r, int k) {
    const int64_t cb = r16_chunk_bytes(w);
    const uint8_t *qb = w->qs + (g * (w->K / QK) + b) * cb;
    if (w->qtype == T_Q8_0) return qb[(k / 4) * 64 + r * 4 + k % 4];
    const uint8_t byte = qb[(k / 8) * 64 + r * 4 + k % 4];
    return (k % 8) < 4 ? byte & 15 : byte >> 4;
}

// groups [g0, g1) of W against the M rows of x: out[m, n] (+)= W[n] . x[m]
static void r16_groups(const R16 *w, int64_t g0, int64_t g1, int64_t M, const QX *x, float *out, int64_t ldo,
                       int accumulate) {
#ifdef HAVE_ZMM
    if (w->qtype == T_Q8_0)
        r16_groups_t(1, w, g0, g1, M, x, out, ldo, accumulate);
    else
        r16_groups_t(0, w, g0, g1, M, x, out, ldo, accumulate);
#else
    const int64_t nb = w->K / QK;
    for (int64_t g = g0; g < g1; g++)
        for (int r = 0; r < 16 && 16 * g + r < w->N; r++)
            for (int64_t m = 0; m < M; m++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    int dot = 0;
                    for (int k = 0; k < QK; k++) dot += r16_value(w, g, b, r, k) * x->q[m * w->K + b * QK + k];
                    const float d = half_to_float(w->sc[(g * nb + b) * 32 + r]);
                    const float mm = half_to_float(w->sc[(g * nb + b) * 32 + 16 + r]);
                    acc += (float)dot * d * x->d[m * nb + b] + mm * x->s[m * nb + b];
                }
                float *o = out + m * ldo + 16 * g + r;
                *o = accumulate ? *o + acc : acc;
            }
#endif
}

// this thread's share of W's row groups against x
static inline void qx_gemm(const QX *x, int64_t M, const R16 *w, int tid, int nth, float *out, int64_t ldo,
                           int accumulate) {
    int64_t g0, g1;
    thread_range((w->N + 15) / 16, tid, nth, &g0, &g1);
    r16_groups(w, g0, g1, M, x, out, ldo, accumulate);
}
