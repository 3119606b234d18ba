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
// A weight may instead be read in place (R16.raw: the file's row-major blocks, e.g. in its map): each 16-row group is
// put in this form as it is read, in registers for a decode step's few rows, into a per-thread buffer for more, so
// the results are the repacked form's bit for bit (gguf_cpu.in_place).
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

#define RAW_PARTS 3

typedef struct {
    const uint8_t *qs;   // [G][K/32][chunk bytes]
    const uint16_t *sc;  // [G][K/32][32]: 16 f16 d, then 16 f16 m
    int64_t qtype, N, K; // qtype: the GGUF type it came from (2 Q4_0, 3 Q4_1, 8 Q8_0)
    // Or, with raw[0] set (qs and sc unused): the file's own row-major blocks, read in place. Rows [end[p-1], end[p])
    // are in part p (a fused weight's shards, e.g. gate and up, where they lie in the file).
    const uint8_t *raw[RAW_PARTS];
    int64_t raw_end[RAW_PARTS];
} R16;

static inline int64_t block_bytes(int64_t qtype) { return qtype == T_Q8_0 ? 34 : qtype == T_Q4_1 ? 20 : 18; }

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

// the same for x float32 or (x_bf16) bf16 [., K] (rows K apart): bf16 read as torch's .float() gives it
static inline void qx_block_any(QX *x, const void *src, int x_bf16, int64_t K, int64_t m, int64_t b) {
    if (!x_bf16) {
        qx_block(x, (const float *)src, K, K, m, b);
        return;
    }
    float xb[QK];
    const uint16_t *row = (const uint16_t *)src + m * K + b * QK;
    for (int k = 0; k < QK; k++) xb[k] = bf16_to_float(row[k]);
    quantize_block(xb, x->q + m * K + b * QK, x->d + m * (K / QK), x->s + m * (K / QK), b);
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_ZMM 1
// One block of 16 rows (wv: chunk c = values 4c..4c+3 of each row as unsigned bytes; d16, m16: the rows' w = d*q + m)
// against T rows of x (m0..): acc[i] lane r += (int dot of the block) * d_r * dx + m_r * sx
static inline __attribute__((always_inline)) void r16_block_dot(const int T, const __m512i wv[8], __m512 d16, __m512 m16,
                                                                const QX *x, int64_t m0, int64_t b, __m512 acc[4]) {
    const int64_t K = x->K, nb = K / QK;
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

// acc[i] (16 rows from row n0, `rows` of them valid) into out rows m0 + i
static inline __attribute__((always_inline)) void r16_tile_store(const int T, const __m512 acc[4], int64_t rows, int64_t n0,
                                                                 int64_t m0, float *out, int64_t ldo, int accumulate) {
    const __mmask16 mask = rows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
    for (int i = 0; i < T; i++) {
        float *o = out + (m0 + i) * ldo + n0;
        const __m512 v = accumulate ? _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(mask, o)) : acc[i];
        _mm512_mask_storeu_ps(o, mask, v);
    }
}

// Rows 16g.. of a repacked W against T rows of x (m0..)
static inline __attribute__((always_inline)) void r16_tile(const int q8, const int T, const R16 *w, int64_t g,
                                                           int64_t m0, const QX *x, float *out, int64_t ldo,
                                                           int accumulate) {
    const int64_t nb = w->K / QK, cb = q8 ? 512 : 256;
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
        r16_block_dot(T, wv, d16, m16, x, m0, b, acc);
    }
    r16_tile_store(T, acc, w->N - 16 * g, 16 * g, m0, out, ldo, accumulate);
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
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_YMM 1
// T rows of x's results for rows n0.. (up to 8, fewer at the end of a weight of N rows) to out (or added to it)
static inline __attribute__((always_inline)) void half_tile_store(const int T, const __m256 acc[4], int64_t N, int64_t n0,
                                                                  int64_t m0, float *out, int64_t ldo, int accumulate) {
    const int64_t rows = N - n0 < 8 ? N - n0 : 8;
    for (int i = 0; i < T; i++) {
        float *o = out + (m0 + i) * ldo + n0;
        if (rows == 8) {
            _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(acc[i], _mm256_loadu_ps(o)) : acc[i]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[i]);
            for (int64_t r = 0; r < rows; r++) o[r] = accumulate ? tmp[r] + o[r] : tmp[r];
        }
    }
}

// AVX2 without VNNI: rows 16g + 8h.. (half h of group g) against T rows of x (m0..). A chunk's 8 dwords (a row's 4
// values each) times 4 broadcast activation bytes: vpmaddubsw multiplies and adds pairs, vpmaddwd sums the pairs to
// dwords. Q4 values (0..15) cannot saturate a pair (2 * 15 * 127); Q8's w + 128 (0..255) could, so it goes as its two
// nibbles, 16 hi + lo, the hi pairs summed by vpmaddwd with 16. The integer dots are exact and each row takes the
// AVX-512 path's float steps (fmadd of the dot by d * dx, then of m by sx): the same results, bit for bit.
static inline __attribute__((always_inline)) void r16_half_tile(const int q8, const int T, const R16 *w, int64_t g,
                                                                int h, int64_t m0, const QX *x, float *out,
                                                                int64_t ldo, int accumulate) {
    const int64_t nb = w->K / QK, cb = q8 ? 512 : 256, K = x->K, nbx = K / QK;  // x's rows are K apart
    const uint8_t *qg = w->qs + g * nb * cb + 32 * h;
    const uint16_t *sg = w->sc + g * nb * 32 + 8 * h;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    __m256 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = qg + b * cb;
        // each 64-byte piece's half split into nibbles, once for the T rows of x: Q4's 4 pieces give the 8 chunks
        // (wv[c]); Q8's 8 pieces give chunk c's low nibbles at wv[2c] and its high ones at wv[2c + 1]
        __m256i wv[16];
        for (int c = 0; c < (q8 ? 8 : 4); c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 64 * c));
            wv[2 * c] = _mm256_and_si256(v, m4);
            wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + b * 32)));
        const __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + b * 32 + 16)));
        for (int i = 0; i < T; i++) {
            const int8_t *xb = x->q + (m0 + i) * K + b * QK;
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i xv = _mm256_set1_epi32(load_i32(xb + 4 * c));
                if (q8) {
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[2 * c], xv), ones));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[2 * c + 1], xv), sixteen));
                } else if (c % 2 == 0) {
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[c], xv), ones));
                } else {
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[c], xv), ones));
                }
            }
            const int64_t xi = (m0 + i) * nbx + b;
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
            acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d8, _mm256_set1_ps(x->d[xi])), acc[i]);
            acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(x->s[xi]), acc[i]);
        }
    }
    half_tile_store(T, acc, w->N, 16 * g + 8 * h, m0, out, ldo, accumulate);
}

static inline __attribute__((always_inline)) void r16_groups_ymm(const int q8, const R16 *w, int64_t g0, int64_t g1,
                                                                 int64_t M, const QX *x, float *out, int64_t ldo,
                                                                 int accumulate) {
    for (int64_t g = g0; g < g1; g++)
        for (int h = 0; h < 2 && 16 * g + 8 * h < w->N; h++) {
            int64_t m0 = 0;
            for (; m0 + 4 <= M; m0 += 4) r16_half_tile(q8, 4, w, g, h, m0, x, out, ldo, accumulate);
            for (; m0 + 2 <= M; m0 += 2) r16_half_tile(q8, 2, w, g, h, m0, x, out, ldo, accumulate);
            if (m0 < M) r16_half_tile(q8, 1, w, g, h, m0, x, out, ldo, accumulate);
        }
}
#endif

// ---- GGUF blocks -> R16 (at load for a repacked weight; a row group at a time, as it is read, for one read in place) ----

// f16 d times -8 (Q4_0) or -128 (Q8_0) as f16, as torch's float16 multiply gives it: the product is exact (a power of
// two), so only overflow (to infinity) and NaN need care.
static inline uint16_t half_times_pow2(uint16_t h, float f) {
    const float v = half_to_float(h) * f;
    uint32_t bits;
    memcpy(&bits, &v, 4);
    const uint16_t sign = (uint16_t)(bits >> 16 & 0x8000u);
    const uint32_t mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7e00u;                // NaN
    if (mag >= 0x477ff000u) return sign | 0x7c00u;               // >= 65520 (exact products: >= 65536): infinity
    if (mag >= 0x38800000u) return sign | (uint16_t)((mag - 0x38000000u) >> 13);  // normal f16 (exact)
    float a;
    memcpy(&a, &mag, 4);
    return sign | (uint16_t)(a * 16777216.0f);  // subnormal f16: |v| / 2^-24, an integer here
}

// One GGUF block (Q4_0 18 bytes: f16 d, 16 bytes of nibbles; Q4_1 20: d, f16 m, nibbles; Q8_0 34: d, 32 int8) as
// lane r of an R16 block: its chunks' dwords at qb (+ 64 per chunk), its d and m in sb[r] and sb[16 + r].
static inline void repack_block(int64_t qtype, const uint8_t *blk, uint8_t *qb, uint16_t *sb, int r) {
    uint16_t d, m;
    memcpy(&d, blk, 2);
    if (qtype == T_Q8_0) {
        for (int c = 0; c < 8; c++) {
            uint32_t w;
            memcpy(&w, blk + 2 + 4 * c, 4);
            w ^= 0x80808080u;  // int8 q + 128 as uint8
            memcpy(qb + 64 * c, &w, 4);
        }
        m = half_times_pow2(d, -128.0f);
    } else {
        uint32_t chunks[4];
        q4_r16_chunks(blk + (qtype == T_Q4_1 ? 4 : 2), chunks);
        for (int c = 0; c < 4; c++) memcpy(qb + 64 * c, &chunks[c], 4);
        if (qtype == T_Q4_1)
            memcpy(&m, blk + 2, 2);
        else
            m = half_times_pow2(d, -8.0f);
    }
    sb[r] = d;
    sb[16 + r] = m;
}

// row `row` of a weight read in place (a short last group repeats the last row: lanes past N are never stored)
static inline const uint8_t *raw_row(const R16 *w, int64_t row) {
    if (row >= w->N) row = w->N - 1;
    int p = 0;
    while (row >= w->raw_end[p]) p++;
    return w->raw[p] + (row - (p ? w->raw_end[p - 1] : 0)) * (w->K / QK) * block_bytes(w->qtype);
}

#ifdef HAVE_ZMM
// Q8_0 block at byte `off` of the 16 rows at rp: chunk c (c = 0..7) = bytes 4c..4c+3 of each row's 32 values, lane r
// = row r. Rows i and i+8 side by side in a register, an 8x8 transpose of dwords in each 256-bit half (unpacks of
// dwords, then qwords, then one two-source permute of qwords).
static inline __attribute__((always_inline)) void raw_q8_chunks(const uint8_t *const rp[16], int64_t off, __m512i ch[8]) {
    __m512i z[8], t[8], u[8];
    for (int i = 0; i < 8; i++)
        z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[i] + off + 2))),
                                  _mm256_loadu_si256((const __m256i *)(rp[i + 8] + off + 2)), 1);
    for (int i = 0; i < 8; i += 2)
        t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
    for (int h = 0; h < 8; h += 4) {  // u[h + j]: dword j (128-bit lanes 0, 2) and j + 4 (lanes 1, 3) of 4 rows
        u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]), u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
        u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]), u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
    }
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int j = 0; j < 4; j++)
        ch[j] = _mm512_permutex2var_epi64(u[j], lo, u[4 + j]), ch[j + 4] = _mm512_permutex2var_epi64(u[j], hi, u[4 + j]);
}

// Q4 block's 16 nibble bytes at byte `off` of the 16 rows: w[k] = bytes 4k..4k+3, lane r = row r. Rows i, i+4, i+8,
// i+12 in one register, a 4x4 transpose of dwords in each 128-bit lane.
static inline __attribute__((always_inline)) void raw_q4_dwords(const uint8_t *const rp[16], int64_t off, __m512i w[4]) {
    __m512i z[4];
    for (int i = 0; i < 4; i++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rp[i] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rp[i + 4] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rp[i + 8] + off)), 2);
        z[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rp[i + 12] + off)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    w[0] = _mm512_unpacklo_epi64(t0, t2), w[1] = _mm512_unpackhi_epi64(t0, t2);
    w[2] = _mm512_unpacklo_epi64(t1, t3), w[3] = _mm512_unpackhi_epi64(t1, t3);
}
#endif

// Block b of the 16 rows at rp (a weight read in place) -> one R16 block (qb: chunk bytes, sb: 32 f16): the same bytes
// as repack_block gives each row.
static inline void raw_pack_block(int64_t qtype, const uint8_t *const rp[16], int64_t b, uint8_t *qb, uint16_t *sb) {
    const int64_t bb = block_bytes(qtype), off = b * bb;
#ifdef HAVE_ZMM
    for (int r = 0; r < 16; r++) memcpy(sb + r, rp[r] + off, 2);
    if (qtype == T_Q4_1) {
        for (int r = 0; r < 16; r++) memcpy(sb + 16 + r, rp[r] + off + 2, 2);
    } else {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sb));
        const __m512 m = _mm512_mul_ps(d, _mm512_set1_ps(qtype == T_Q8_0 ? -128.0f : -8.0f));  // exact, as f16
        _mm256_storeu_si256((__m256i *)(sb + 16), _mm512_cvtps_ph(m, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    if (qtype == T_Q8_0) {
        __m512i ch[8];
        raw_q8_chunks(rp, off, ch);
        const __m512i flip = _mm512_set1_epi8((char)0x80);  // int8 q + 128 as uint8
        for (int c = 0; c < 8; c++) _mm512_storeu_si512(qb + 64 * c, _mm512_xor_si512(ch[c], flip));
    } else {
        __m512i w[4];  // to the R16 chunks as q4_r16_chunks does, on 16 lanes at once
        raw_q4_dwords(rp, off + (qtype == T_Q4_1 ? 4 : 2), w);
        const __m512i l4 = _mm512_set1_epi8(0x0F), h4 = _mm512_set1_epi8((char)0xF0);
        _mm512_storeu_si512(qb, _mm512_or_si512(_mm512_and_si512(w[0], l4), _mm512_slli_epi32(_mm512_and_si512(w[1], l4), 4)));
        _mm512_storeu_si512(qb + 64, _mm512_or_si512(_mm512_and_si512(w[2], l4), _mm512_slli_epi32(_mm512_and_si512(w[3], l4), 4)));
        _mm512_storeu_si512(qb + 128, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w[0], 4), l4), _mm512_and_si512(w[1], h4)));
        _mm512_storeu_si512(qb + 192, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w[2], 4), l4), _mm512_and_si512(w[3], h4)));
    }
#elif defined(HAVE_YMM)
    if (qtype != T_Q8_0) {
        for (int r = 0; r < 16; r++) repack_block(qtype, rp[r] + off, qb + 4 * r, sb, r);
        return;
    }
    // Q8_0, 8 rows at a time: d as stored, m = -128 d (exact, as f16), the rows' 8 dwords transposed in registers
    // (unpacks of dwords, of qwords, then 128-bit halves) into the chunks, as raw_q8_chunks does for 16
    for (int r = 0; r < 16; r++) memcpy(sb + r, rp[r] + off, 2);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int h = 0; h < 2; h++) {
        const __m256 m = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 8 * h))), _mm256_set1_ps(-128.0f));
        _mm_storeu_si128((__m128i *)(sb + 16 + 8 * h), _mm256_cvtps_ph(m, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i z[8], t[8], u[8];
        for (int i = 0; i < 8; i++) z[i] = _mm256_loadu_si256((const __m256i *)(rp[8 * h + i] + off + 2));
        for (int i = 0; i < 8; i += 2)
            t[i] = _mm256_unpacklo_epi32(z[i], z[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(z[i], z[i + 1]);
        for (int j = 0; j < 8; j += 4) {  // u[j + c]: dword c (low half) and c + 4 (high half) of 4 rows
            u[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]), u[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
            u[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]), u[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
        }
        for (int c = 0; c < 4; c++) {
            _mm256_storeu_si256((__m256i *)(qb + 64 * c + 32 * h), _mm256_xor_si256(_mm256_permute2x128_si256(u[c], u[4 + c], 0x20), flip));
            _mm256_storeu_si256((__m256i *)(qb + 64 * (c + 4) + 32 * h), _mm256_xor_si256(_mm256_permute2x128_si256(u[c], u[4 + c], 0x31), flip));
        }
    }
#else
    for (int r = 0; r < 16; r++) repack_block(qtype, rp[r] + off, qb + 4 * r, sb, r);
#endif
}

// the 16 rows of group g of a weight read in place
static inline void raw_group_rows(const R16 *w, int64_t g, const uint8_t *rp[16]) {
    for (int r = 0; r < 16; r++) rp[r] = raw_row(w, 16 * g + r);
}

// Group g of a weight read in place, packed into this thread's buffer as a one-group R16 view (the rows it holds:
// min(16, N - 16 g)); the buffer is reused by the thread's next call.
static inline R16 raw_group_view(const R16 *w, int64_t g) {
    static __thread uint8_t *buf;
    static __thread int64_t cap;
    const int64_t nb = w->K / QK, cb = r16_chunk_bytes(w), need = nb * (cb + 64);
    if (need > cap) {
        free(buf);
        buf = aligned_alloc(64, (size_t)((need + 63) / 64 * 64));
        cap = buf ? need : 0;
        if (!buf) abort();  // out of memory for a few KB: nothing sensible to return
    }
    const uint8_t *rp[16];
    raw_group_rows(w, g, rp);
    uint16_t *sc = (uint16_t *)(buf + nb * cb);
    for (int64_t b = 0; b < nb; b++) {
        if (b + 4 < nb)
            for (int r = 0; r < 16; r++) __builtin_prefetch(rp[r] + (b + 4) * block_bytes(w->qtype));
        raw_pack_block(w->qtype, rp, b, buf + b * cb, sc + b * 32);
    }
    const int64_t rows = w->N - 16 * g < 16 ? w->N - 16 * g : 16;
    R16 v = {buf, sc, w->qtype, rows, w->K, {NULL}, {0}};
    return v;
}

// Row groups [g0, g1) of W (rows [16 g0, min(16 g1, N))) as a weight of their own: its group 0 is W's group g0, so a
// caller can write their results to a buffer of just those columns.
static inline R16 r16_rows(const R16 *w, int64_t g0, int64_t g1) {
    R16 v = *w;
    const int64_t r0 = 16 * g0, r1 = 16 * g1 < w->N ? 16 * g1 : w->N, nb = w->K / QK;
    v.N = r1 - r0;
    if (!w->raw[0]) {
        v.qs = w->qs + g0 * nb * r16_chunk_bytes(w);
        v.sc = w->sc + g0 * nb * 32;
        return v;
    }
    const int64_t rb = nb * block_bytes(w->qtype);
    int q = 0;
    for (int p = 0; p < RAW_PARTS; p++) v.raw[p] = NULL, v.raw_end[p] = 0;
    for (int p = 0; p < RAW_PARTS && w->raw[p]; p++) {  // the parts the rows fall in, cut to them
        const int64_t s = p ? w->raw_end[p - 1] : 0, e = w->raw_end[p];
        const int64_t a = s > r0 ? s : r0, b = e < r1 ? e : r1;
        if (a < b) v.raw[q] = w->raw[p] + (a - s) * rb, v.raw_end[q++] = b - r0;
    }
    return v;
}

// the integer value of row r, element k of block b of group g (0..15 for Q4, w+128 for Q8)
static inline int r16_value(const R16 *w, int64_t g, int64_t b, int r, int k) {
    const int64_t cb = r16_chunk_bytes(w);
    const uint8_t *qb = w->qs + (g * (w->K / QK) + b) * cb;
    if (w->qtype == T_Q8_0) return qb[(k / 4) * 64 + r * 4 + k % 4];
    const uint8_t byte = qb[(k / 8) * 64 + r * 4 + k % 4];
    return (k % 8) < 4 ? byte & 15 : byte >> 4;
}

// groups [g0, g1) of a repacked W against the M rows of x
static void r16_groups_packed(const R16 *w, int64_t g0, int64_t g1, int64_t M, const QX *x, float *out, int64_t ldo,
                              int accumulate) {
#ifdef HAVE_ZMM
    if (w->qtype == T_Q8_0)
        r16_groups_t(1, w, g0, g1, M, x, out, ldo, accumulate);
    else
        r16_groups_t(0, w, g0, g1, M, x, out, ldo, accumulate);
#elif defined(HAVE_YMM)
    if (w->qtype == T_Q8_0)
        r16_groups_ymm(1, w, g0, g1, M, x, out, ldo, accumulate);
    else
        r16_groups_ymm(0, w, g0, g1, M, x, out, ldo, accumulate);
#else
    const int64_t nb = w->K / QK, nbx = x->K / QK;  // x's rows are x->K apart
    for (int64_t g = g0; g < g1; g++)
        for (int r = 0; r < 16 && 16 * g + r < w->N; r++)
            for (int64_t m = 0; m < M; m++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    int dot = 0;
                    for (int k = 0; k < QK; k++) dot += r16_value(w, g, b, r, k) * x->q[m * x->K + b * QK + k];
                    const float d = half_to_float(w->sc[(g * nb + b) * 32 + r]);
                    const float mm = half_to_float(w->sc[(g * nb + b) * 32 + 16 + r]);
                    acc += (float)dot * d * x->d[m * nbx + b] + mm * x->s[m * nbx + b];
                }
                float *o = out + m * ldo + 16 * g + r;
                *o = accumulate ? *o + acc : acc;
            }
#endif
}

#ifdef HAVE_ZMM
// Rows 16g.. of a weight read in place against T rows of x, each block transposed in registers (no buffer): for the
// few rows of a decode step, where a group is read once. The same registers as r16_tile would load for the repacked
// form (m as the f16 the repack writes), so the same results.
static inline __attribute__((always_inline)) void raw_tile(const int qt, const int T, const R16 *w, int64_t g,
                                                           const uint8_t *next, int64_t m0, const QX *x, float *out,
                                                           int64_t ldo, int accumulate) {
    const int64_t nb = w->K / QK, bb = qt == T_Q8_0 ? 34 : qt == T_Q4_1 ? 20 : 18;
    const uint8_t *rp[16];
    raw_group_rows(w, g, rp);
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t off = b * bb;
        if (next)
            for (int64_t p = b * 16 * bb; p < (b + 1) * 16 * bb; p += 64) _mm_prefetch((const char *)(next + p), _MM_HINT_T1);
        uint32_t dw[16];  // per row: f16 d, then Q4_1's m (scalar loads: a vector gather costs several times more)
        for (int r = 0; r < 16; r++) memcpy(dw + r, rp[r] + off, 4);
        const __m512i dm = _mm512_loadu_si512(dw);
        const __m512 d16 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        __m512 m16;
        if (qt == T_Q4_1) {
            m16 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
        } else {
            const __m512 m = _mm512_mul_ps(d16, _mm512_set1_ps(qt == T_Q8_0 ? -128.0f : -8.0f));
            m16 = _mm512_cvtph_ps(_mm512_cvtps_ph(m, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        __m512i wv[8];
        if (qt == T_Q8_0) {
            raw_q8_chunks(rp, off, wv);
            for (int c = 0; c < 8; c++) wv[c] = _mm512_xor_si512(wv[c], flip);
        } else {
            __m512i d4[4];  // bytes 4j..4j+3: values 4j.. in the low nibbles, 16 + 4j.. in the high ones
            raw_q4_dwords(rp, off + (qt == T_Q4_1 ? 4 : 2), d4);
            for (int j = 0; j < 4; j++)
                wv[j] = _mm512_and_si512(d4[j], m4), wv[j + 4] = _mm512_and_si512(_mm512_srli_epi32(d4[j], 4), m4);
        }
        r16_block_dot(T, wv, d16, m16, x, m0, b, acc);
    }
    r16_tile_store(T, acc, w->N - 16 * g, 16 * g, m0, out, ldo, accumulate);
}

// One row of x against rows 16g.. of a Q8_0 weight read in place, without the transpose: rows i and i+8 of a block
// side by side in a register (8 dwords each) against the row of x's block in both halves, one dpbusd per pair; the
// 8 registers' per-row dword sums are reduced with 14 shuffles (unpacks of dwords, of qwords, then 128-bit lanes),
// where the transpose took 24, leaving the rows in lane order 0-3, 8-11, 4-7, 12-15, which the scales are gathered in
// and the result is put back from. The same integer dots and the same float steps as r16_tile: the same results.
static inline void raw_tile1_q8(const R16 *w, int64_t g, const uint8_t *next, int64_t m0, const QX *x, float *out,
                                int64_t ldo, int accumulate) {
    static const int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};  // row in each lane
    const int64_t nb = w->K / QK, bb = 34;
    const uint8_t *rp[16];
    raw_group_rows(w, g, rp);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *xq = x->q + m0 * x->K;
    const float *xd = x->d + m0 * nb, *xs = x->s + m0 * nb;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t off = b * bb;
        if (next)
            for (int64_t p = b * 16 * bb; p < (b + 1) * 16 * bb; p += 64) _mm_prefetch((const char *)(next + p), _MM_HINT_T1);
        uint32_t dw[16];  // per lane: its row's f16 d (and 2 bytes of q, dropped)
        for (int l = 0; l < 16; l++) memcpy(dw + l, rp[order[l]] + off, 4);
        const __m512 d16 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_loadu_si512(dw)));
        const __m512 m16 = _mm512_cvtph_ps(
            _mm512_cvtps_ph(_mm512_mul_ps(d16, _mm512_set1_ps(-128.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + b * QK)));
        __m512i p[8];
        for (int i = 0; i < 8; i++) {
            const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[i] + off + 2))),
                                                 _mm256_loadu_si256((const __m256i *)(rp[i + 8] + off + 2)), 1);
            p[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(z, flip), xv);
        }
        __m512i q[4], r[2];
        for (int i = 0; i < 4; i++)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of rows 2i, 2i+1
            q[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_epi32(p[2 * i], p[2 * i + 1]));
        for (int i = 0; i < 2; i++)  // per 128-bit lane: the lane's sum of each of 4 rows
            r[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2 * i], q[2 * i + 1]), _mm512_unpackhi_epi64(q[2 * i], q[2 * i + 1]));
        const __m512i dot = _mm512_add_epi32(_mm512_shuffle_i32x4(r[0], r[1], 0x88), _mm512_shuffle_i32x4(r[0], r[1], 0xDD));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d16, _mm512_set1_ps(xd[b])), acc);
        acc = _mm512_fmadd_ps(m16, _mm512_set1_ps(xs[b]), acc);
    }
    const __m512 rows = _mm512_permutexvar_ps(_mm512_loadu_si512(order), acc);  // the order is its own inverse
    r16_tile_store(1, &rows, w->N - 16 * g, 16 * g, m0, out, ldo, accumulate);
}

static inline __attribute__((always_inline)) void raw_groups_t(const int qt, const R16 *w, int64_t g0, int64_t g1,
                                                               int64_t M, const QX *x, float *out, int64_t ldo,
                                                               int accumulate) {
    for (int64_t g = g0; g < g1; g++) {
        // The run's next group (16 rows in a row: one span of the file) is fetched while this one is read, a block's
        // worth of bytes per block: one sequential stream, where this group's 16 rows read in turn make 16 short ones.
        const uint8_t *next = g + 1 < g1 ? raw_row(w, 16 * (g + 1)) : NULL;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) raw_tile(qt, 4, w, g, m0 ? NULL : next, m0, x, out, ldo, accumulate);
        for (; m0 + 2 <= M; m0 += 2) raw_tile(qt, 2, w, g, m0 ? NULL : next, m0, x, out, ldo, accumulate);
        if (m0 < M && qt == T_Q8_0)
            raw_tile1_q8(w, g, m0 ? NULL : next, m0, x, out, ldo, accumulate);
        else if (m0 < M)
            raw_tile(qt, 1, w, g, m0 ? NULL : next, m0, x, out, ldo, accumulate);
    }
}
#endif

// rows of x up to which a weight read in place is transposed in registers per tile rather than packed per group
#define RAW_REGISTER_ROWS 4

#ifdef HAVE_YMM
// Half h of group g of a Q8_0 weight read in place (rows 16g + 8h..) against T rows of x, straight from the file's
// blocks (no packing): per row, its 32 codes q against x's block with llama.cpp's sign trick, vpmaddubsw of |q| (a
// code of -128 reads as 128 unsigned) and x's codes with q's signs (|x| <= 127, so pairs stay under 2^15), summed by
// vpmaddwd; the 8 rows' dword sums are reduced with vphaddd. Adding 128 * sum(x) (xs128) gives the repacked form's
// integer dot of q + 128 exactly, then each row takes r16_half_tile's float steps: the same results, bit for bit.
static inline __attribute__((always_inline)) void raw_half_tile_q8(const int T, const R16 *w, int64_t g, int h,
                                                                   const uint8_t *next, int64_t m0, const QX *x,
                                                                   const int32_t *xs128, float *out, int64_t ldo,
                                                                   int accumulate) {
    const int64_t nb = w->K / QK, bb = 34, K = x->K, nbx = K / QK;  // x's rows are K apart
    const uint8_t *rp[8];
    for (int r = 0; r < 8; r++) rp[r] = raw_row(w, 16 * g + 8 * h + r);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t off = b * bb;
        if (next)
            for (int64_t p = (h * nb + b) * 8 * bb; p < (h * nb + b + 1) * 8 * bb; p += 64)
                _mm_prefetch((const char *)(next + p), _MM_HINT_T1);
        uint16_t dh[8];
        for (int r = 0; r < 8; r++) memcpy(dh + r, rp[r] + off, 2);
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
        const __m256 m8 = _mm256_cvtph_ps(
            _mm256_cvtps_ph(_mm256_mul_ps(d8, _mm256_set1_ps(-128.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i xv[4], s[4][2];  // s[i][q]: rows 4q..4q+3 of x row i, per 128-bit lane (vphaddd's layout)
        for (int i = 0; i < T; i++) xv[i] = _mm256_loadu_si256((const __m256i *)(x->q + (m0 + i) * K + b * QK));
        for (int q = 0; q < 2; q++) {
            __m256i pair[4][2];
            for (int j = 0; j < 2; j++) {
                __m256i p[4][2];
                for (int k = 0; k < 2; k++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(rp[4 * q + 2 * j + k] + off + 2));
                    const __m256i aw = _mm256_sign_epi8(wv, wv);
                    for (int i = 0; i < T; i++)
                        p[i][k] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[i], wv)), ones);
                }
                for (int i = 0; i < T; i++) pair[i][j] = _mm256_hadd_epi32(p[i][0], p[i][1]);
            }
            for (int i = 0; i < T; i++) s[i][q] = _mm256_hadd_epi32(pair[i][0], pair[i][1]);
        }
        for (int i = 0; i < T; i++) {
            const int64_t xi = (m0 + i) * nbx + b;
            __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(s[i][0], s[i][1], 0x20),
                                           _mm256_permute2x128_si256(s[i][0], s[i][1], 0x31));
            dot = _mm256_add_epi32(dot, _mm256_set1_epi32(xs128[(m0 + i) * nb + b]));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d8, _mm256_set1_ps(x->d[xi])), acc[i]);
            acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(x->s[xi]), acc[i]);
        }
    }
    half_tile_store(T, acc, w->N, 16 * g + 8 * h, m0, out, ldo, accumulate);
}

// groups [g0, g1) of a Q8_0 weight read in place against M <= 4 rows of x, each group's next one fetched as it goes
static void raw_groups_q8_ymm(const R16 *w, int64_t g0, int64_t g1, int64_t M, const QX *x, float *out, int64_t ldo,
                              int accumulate) {
    const int64_t nb = w->K / QK;
    int32_t xs128[RAW_REGISTER_ROWS * nb];  // per row of x and block: 128 * the sum of its codes
    for (int64_t i = 0; i < M * nb; i++) {
        const int8_t *q = x->q + (i / nb) * x->K + (i % nb) * QK;
        int sum = 0;
        for (int k = 0; k < QK; k++) sum += q[k];
        xs128[i] = 128 * sum;
    }
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *next = g + 1 < g1 ? raw_row(w, 16 * (g + 1)) : NULL;
        for (int h = 0; h < 2 && 16 * g + 8 * h < w->N; h++) {
            if (M == 1) raw_half_tile_q8(1, w, g, h, next, 0, x, xs128, out, ldo, accumulate);
            else if (M == 2) raw_half_tile_q8(2, w, g, h, next, 0, x, xs128, out, ldo, accumulate);
            else if (M == 3) raw_half_tile_q8(3, w, g, h, next, 0, x, xs128, out, ldo, accumulate);
            else raw_half_tile_q8(4, w, g, h, next, 0, x, xs128, out, ldo, accumulate);
        }
    }
}
#endif

// groups [g0, g1) of W against the M rows of x: out[m, n] (+)= W[n] . x[m]. A weight read in place is packed a group
// at a time into this thread's buffer, then read as a repacked one: the same bytes, so the same results, bit for bit.
static void r16_groups(const R16 *w, int64_t g0, int64_t g1, int64_t M, const QX *x, float *out, int64_t ldo,
                       int accumulate) {
    if (!w->raw[0]) {
        r16_groups_packed(w, g0, g1, M, x, out, ldo, accumulate);
        return;
    }
#ifdef HAVE_ZMM
    if (M <= RAW_REGISTER_ROWS) {
        // each group fetches the next one as it goes (raw_tile); the run's first group is asked for here, at once
        const int64_t span = (w->N - 16 * g0 < 16 ? w->N - 16 * g0 : 16) * (w->K / QK) * block_bytes(w->qtype);
        const uint8_t *first = raw_row(w, 16 * g0);
        for (int64_t p = 0; p < span; p += 64) _mm_prefetch((const char *)(first + p), _MM_HINT_T1);
        if (w->qtype == T_Q8_0)
            raw_groups_t(T_Q8_0, w, g0, g1, M, x, out, ldo, accumulate);
        else if (w->qtype == T_Q4_1)
            raw_groups_t(T_Q4_1, w, g0, g1, M, x, out, ldo, accumulate);
        else
            raw_groups_t(T_Q4_0, w, g0, g1, M, x, out, ldo, accumulate);
        return;
    }
#elif defined(HAVE_YMM)
    if (M <= RAW_REGISTER_ROWS && w->qtype == T_Q8_0) {
        const int64_t span = (w->N - 16 * g0 < 16 ? w->N - 16 * g0 : 16) * (w->K / QK) * block_bytes(w->qtype);
        const uint8_t *first = raw_row(w, 16 * g0);
        for (int64_t p = 0; p < span; p += 64) _mm_prefetch((const char *)(first + p), _MM_HINT_T1);
        raw_groups_q8_ymm(w, g0, g1, M, x, out, ldo, accumulate);
        return;
    }
#endif
    for (int64_t g = g0; g < g1; g++) {
        const R16 v = raw_group_view(w, g);
        r16_groups_packed(&v, 0, 1, M, x, out + 16 * g, ldo, accumulate);
    }
}

// this thread's share of W's row groups against x
static inline void qx_gemm(const QX *x, int64_t M, const R16 *w, int tid, int nth, float *out, int64_t ldo,
                           int accumulate) {
    int64_t g0, g1;
    thread_range((w->N + 15) / 16, tid, nth, &g0, &g1);
    r16_groups(w, g0, g1, M, x, out, ldo, accumulate);
}
