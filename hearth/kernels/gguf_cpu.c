// GGUF-quantized CPU kernels, called through ctypes from hearth/kernels/gguf_cpu.py.
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
//
// r16_gemm: out[m, n] (+)= sum_k x[m, k] * W[n, k] (int8 activations). r16_dequant: rows -> float32 or bf16 (exact,
// as gguf-py dequantizes), for the dense bf16 matmuls of non-fused steps.
// llama_decode: a whole Llama-family forward (pre-norm attention + SwiGLU MLP, rotate-half RoPE, GQA, optional q/k/v
// bias, sliding window) for M sequences decoding one token each, over Hearth's paged bf16 KV cache, in one
// OpenMP parallel region. Everything between the matmuls is float32.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel_common.h"
#include "paged_attention.h"

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

void gguf_quantize_q8(int64_t M, int64_t K, const float *x, int8_t *q, float *d, float *s) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / QK; b++)
            quantize_block(x + m * K + b * QK, q + m * K + b * QK, d + m * (K / QK), s + m * (K / QK), b);
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

void r16_gemm(int64_t M, const R16 *w, const float *x, float *out, int accumulate, int nthreads) {
    const int64_t K = w->K;
    QX qx = qx_alloc(M, K);
    qx.K = K;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * (K / QK); i++) qx_block(&qx, x, K, K, i / (K / QK), i % (K / QK));
        qx_gemm(&qx, M, w, TID, NTH, out, w->N, accumulate);
    }
    qx_free(&qx);
}

// row r of group g, block b -> 32 floats, exactly as gguf-py dequantizes the original block
static inline void r16_dequant_block(const R16 *w, int64_t g, int64_t b, int r, float *row) {
    const int64_t nb = w->K / QK;
    const uint8_t *qb = w->qs + (g * nb + b) * r16_chunk_bytes(w) + 4 * r;
    const float d = half_to_float(w->sc[(g * nb + b) * 32 + r]);
    if (w->qtype == T_Q8_0) {
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 4; j++) row[4 * c + j] = (float)(qb[64 * c + j] - 128) * d;
        return;
    }
    int q[QK];
    for (int c = 0; c < 4; c++)
        for (int j = 0; j < 4; j++) {
            q[8 * c + j] = qb[64 * c + j] & 15;
            q[8 * c + 4 + j] = qb[64 * c + j] >> 4;
        }
    if (w->qtype == T_Q4_1) {
        const float m = half_to_float(w->sc[(g * nb + b) * 32 + 16 + r]);
        for (int k = 0; k < QK; k++) row[k] = d * (float)q[k] + m;
    } else {
        for (int k = 0; k < QK; k++) row[k] = d * (float)(q[k] - 8);
    }
}

// W -> [N, K] float32 (out_bf16 = 0) or bf16 (out_bf16 = 1)
#ifdef HAVE_ZMM
// 32 values of a row to dst: bf16 (streamed when asked and dst starts a 64-byte line; see r16_dequant) or float32
static inline void store_row32(void *dst, __m512 v0, __m512 v1, int out_bf16, int stream) {
    if (out_bf16 && stream && ((uintptr_t)dst & 63) == 0) {
        _mm512_stream_si512((__m512i *)dst, _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16_round(v0)), bf16x16_round(v1), 1));
    } else if (out_bf16) {
        _mm256_storeu_si256((__m256i *)dst, bf16x16_round(v0));
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + 16), bf16x16_round(v1));
    } else {
        _mm512_storeu_ps((float *)dst, v0);
        _mm512_storeu_ps((float *)dst + 16, v1);
    }
}

// Rows 16g.. (`rows` of them) of block b, as r16_dequant_block computes them: the chunk's 64-byte pieces (a dword per
// row each: Q4 nibbles of 8 values, or Q8 bytes of 4) are loaded whole and put back in value order per 128-bit lane,
// four rows to a register (unpacks of dwords, then of qwords), and the 16 scales are converted at once.
static void r16_dequant_group(const R16 *w, int64_t g, int64_t b, int rows, uint8_t *dst, int64_t row_bytes,
                              int out_bf16, int stream) {
    const int64_t nb = w->K / QK;
    const uint8_t *qb = w->qs + (g * nb + b) * r16_chunk_bytes(w);
    const uint16_t *sc = w->sc + (g * nb + b) * 32;
    float d[16], m[16];
    _mm512_storeu_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc)));
    _mm512_storeu_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16))));
    __m512i t[8];  // per lane L, pairs of pieces interleaved: t[2i] rows 4L, 4L+1 and t[2i+1] rows 4L+2, 4L+3
    if (w->qtype == T_Q8_0) {  // pieces c = 0..7: values 4c..4c+3 of each row
        for (int i = 0; i < 4; i++) {
            const __m512i a = _mm512_loadu_si512(qb + 128 * i), e = _mm512_loadu_si512(qb + 128 * i + 64);
            t[2 * i] = _mm512_unpacklo_epi32(a, e), t[2 * i + 1] = _mm512_unpackhi_epi32(a, e);
        }
    } else {  // pieces c = 0..3: values 8c..8c+3 in the low nibbles, 8c+4..8c+7 in the high ones
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        for (int c = 0; c < 4; c++) {
            const __m512i z = _mm512_loadu_si512(qb + 64 * c);
            const __m512i lo = _mm512_and_si512(z, m4), hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
            t[2 * c] = _mm512_unpacklo_epi32(lo, hi), t[2 * c + 1] = _mm512_unpackhi_epi32(lo, hi);
        }
    }
    // values 0..15 and 16..31 of row 4L + k in lane L of q[k][0] and q[k][1]
    const __m512i q[4][2] = {{_mm512_unpacklo_epi64(t[0], t[2]), _mm512_unpacklo_epi64(t[4], t[6])},
                             {_mm512_unpackhi_epi64(t[0], t[2]), _mm512_unpackhi_epi64(t[4], t[6])},
                             {_mm512_unpacklo_epi64(t[1], t[3]), _mm512_unpacklo_epi64(t[5], t[7])},
                             {_mm512_unpackhi_epi64(t[1], t[3]), _mm512_unpackhi_epi64(t[5], t[7])}};
    const __m512 eight = _mm512_set1_ps(8.0f);
    const __m512i c128 = _mm512_set1_epi32(128);
#define R16_GROUP_LANE(L)                                                                                             \
    for (int k = 0; k < 4; k++) {                                                                                     \
        const int r = 4 * (L) + k;                                                                                    \
        if (r >= rows) break;                                                                                         \
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q[k][0], L));                               \
        const __m512i i1 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q[k][1], L));                               \
        const __m512 dr = _mm512_set1_ps(d[r]);                                                                       \
        __m512 v0, v1;                                                                                                \
        if (w->qtype == T_Q4_1) {                                                                                     \
            const __m512 mr = _mm512_set1_ps(m[r]);                                                                   \
            v0 = _mm512_add_ps(_mm512_mul_ps(dr, _mm512_cvtepi32_ps(i0)), mr);                                        \
            v1 = _mm512_add_ps(_mm512_mul_ps(dr, _mm512_cvtepi32_ps(i1)), mr);                                        \
        } else if (w->qtype == T_Q4_0) {                                                                              \
            v0 = _mm512_mul_ps(dr, _mm512_sub_ps(_mm512_cvtepi32_ps(i0), eight));                                     \
            v1 = _mm512_mul_ps(dr, _mm512_sub_ps(_mm512_cvtepi32_ps(i1), eight));                                     \
        } else {                                                                                                      \
            v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0, c128)), dr);                                   \
            v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1, c128)), dr);                                   \
        }                                                                                                             \
        store_row32(dst + r * row_bytes, v0, v1, out_bf16, stream);                                                   \
    }
    R16_GROUP_LANE(0)
    R16_GROUP_LANE(1)
    R16_GROUP_LANE(2)
    R16_GROUP_LANE(3)
#undef R16_GROUP_LANE
}
#endif

// rows [16 g0, min(16 g1, N)) of W into out (row 16 g0 first). With `stream`, bf16 rows that start a 64-byte line
// (all of them in torch's buffers: K is a multiple of 32) go out with non-temporal stores, which skip the cache: the
// caller picks whichever has lately been faster (gguf_cpu.py, StorePicker).
void r16_dequant(const R16 *w, int64_t g0, int64_t g1, void *out, int out_bf16, int stream, int nthreads) {
    const int64_t nb = w->K / QK, esize = out_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t gb = g0 * nb; gb < g1 * nb; gb++) {
            const int64_t g = gb / nb, b = gb % nb;
            const int rows = (int)(w->N - 16 * g < 16 ? w->N - 16 * g : 16);
            uint8_t *dst = (uint8_t *)out + (16 * (g - g0) * w->K + b * QK) * esize;
#ifdef HAVE_ZMM
            r16_dequant_group(w, g, b, rows, dst, w->K * esize, out_bf16, stream);
#else
            (void)stream;
            for (int r = 0; r < rows; r++) {
                float row[QK];
                r16_dequant_block(w, g, b, r, row);
                if (out_bf16)
                    for (int k = 0; k < QK; k++) ((uint16_t *)(dst + r * w->K * esize))[k] = float_to_bf16(row[k]);
                else
                    memcpy(dst + r * w->K * esize, row, sizeof(row));
            }
#endif
        }
#ifdef HAVE_ZMM
        _mm_sfence();  // this thread's streamed lines are visible before the region's closing barrier
#endif
    }
}

// ---- a Llama-family decode step ----

typedef struct {
    const float *input_norm, *post_norm;                 // [H]
    R16 qkv, o, gate_up, down;                           // [(Hq+2Hkv)*D, H], [H, Hq*D], [2I, H], [H, I]
    const float *qkv_bias;                               // [(Hq+2Hkv)*D] or NULL
    uint16_t *k_cache, *v_cache;                         // bf16 [slots, Hkv, D]
    int64_t window;                                      // 0: full attention
} LayerWeights;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    const LayerWeights *layers;
    const float *final_norm;     // [H]
    const float *cos, *sin;      // [max_pos, D] (rotate-half tables, D values per position)
    R16 lm_head;                 // [V, H]; qs NULL: logits are not computed
    int64_t vocab;
} ModelWeights;

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// h: [M, H] float32 embeddings in, final-normed hidden states out; logits: [M, V] when the model has an LM head.
// positions, context_lens: [M]; block_tables: [M, max_blocks]; the new token of row m goes to slot_mapping[m].
// sizeof the structs ctypes mirrors (R16, LayerWeights, ModelWeights), for a layout check from Python
void gguf_struct_sizes(int64_t *out) {
    out[0] = (int64_t)sizeof(R16);
    out[1] = (int64_t)sizeof(LayerWeights);
    out[2] = (int64_t)sizeof(ModelWeights);
}

void llama_decode(const ModelWeights *mw, int64_t M, float *h, const int64_t *positions, const int64_t *slot_mapping,
                  const int64_t *block_tables, int64_t max_blocks, int64_t block_size, const int64_t *context_lens,
                  float *logits, int nthreads) {
    const int64_t H = mw->hidden, D = mw->head_dim, Hq = mw->num_heads, Hkv = mw->num_kv_heads, I = mw->intermediate;
    const int64_t qsz = Hq * D, kvsz = Hkv * D, nqkv = qsz + 2 * kvsz;
    const int64_t kmax = I > qsz ? (I > H ? I : H) : (qsz > H ? qsz : H);
    int64_t max_len = 1;
    for (int64_t m = 0; m < M; m++) max_len = context_lens[m] > max_len ? context_lens[m] : max_len;
    float *xn = malloc(sizeof(float) * (size_t)(M * H));
    float *qkv = malloc(sizeof(float) * (size_t)(M * nqkv));
    float *att = malloc(sizeof(float) * (size_t)(M * qsz));
    float *gu = malloc(sizeof(float) * (size_t)(M * 2 * I));
    const int64_t G = Hq / Hkv, nchunks = decode_chunks(max_len), pstride = G * (2 + D);
    float *abuf = malloc(sizeof(float) * (size_t)(nthreads * decode_scratch_floats(G, D)));
    float *parts = malloc(sizeof(float) * (size_t)(M * Hkv * nchunks * pstride));
    QX qx = qx_alloc(M, kmax);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = TID, nth = NTH;
        QX lx = qx;  // this thread's view: the buffers are shared, the row width K is set per matmul
        for (int64_t l = 0; l < mw->num_layers; l++) {
            const LayerWeights *L = &mw->layers[l];
            // attention block: xn = norm(h) -> int8; qkv = xn W^T (+ b)
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->input_norm, mw->eps, H, xn + m * H);
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
            qx_gemm(&lx, M, &L->qkv, tid, nth, qkv, nqkv, 0);
#pragma omp barrier
            // bias, rope on q and k heads, the new k and v into the cache
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (Hq + 2 * Hkv); i++) {
                const int64_t m = i / (Hq + 2 * Hkv), hh = i % (Hq + 2 * Hkv);
                float *r = qkv + m * nqkv + hh * D;
                if (L->qkv_bias)
                    for (int64_t j = 0; j < D; j++) r[j] += L->qkv_bias[hh * D + j];
                if (hh < Hq + Hkv) rope(r, mw->cos + positions[m] * D, mw->sin + positions[m] * D, D);
                if (hh >= Hq) {
                    uint16_t *dst = (hh < Hq + Hkv ? L->k_cache : L->v_cache) + slot_mapping[m] * kvsz + ((hh - Hq) % Hkv) * D;
                    for (int64_t j = 0; j < D; j++) dst[j] = float_to_bf16(r[j]);
                }
            }
            decode_attention(M, qkv, nqkv, Hq, Hkv, D, L->k_cache, L->v_cache, kvsz, block_tables, max_blocks,
                             block_size, context_lens, L->window, mw->scale, nchunks, abuf, parts, att, qsz, tid);
            lx.K = qsz;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (qsz / QK); i++) qx_block(&lx, att, qsz, qsz, i / (qsz / QK), i % (qsz / QK));
            qx_gemm(&lx, M, &L->o, tid, nth, h, H, 1);  // h += attn W_o^T
#pragma omp barrier
            // MLP block: h += down(silu(gate) * up)
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->post_norm, mw->eps, H, xn + m * H);
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
            qx_gemm(&lx, M, &L->gate_up, tid, nth, gu, 2 * I, 0);
#pragma omp barrier
            lx.K = I;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (I / QK); i++) {
                const int64_t m = i / (I / QK), b = i % (I / QK);
                float *g = gu + m * 2 * I + b * QK;
                const float *u = g + I;
                for (int j = 0; j < QK; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];  // in place: gate -> act
                qx_block(&lx, gu, 2 * I, I, m, b);
            }
            qx_gemm(&lx, M, &L->down, tid, nth, h, H, 1);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            rms_norm(h + m * H, mw->final_norm, mw->eps, H, xn + m * H);
            memcpy(h + m * H, xn + m * H, sizeof(float) * (size_t)H);
        }
        if (mw->lm_head.qs && logits) {
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, h, H, H, i / (H / QK), i % (H / QK));
            qx_gemm(&lx, M, &mw->lm_head, tid, nth, logits, mw->vocab, 0);
        }
    }
    free(xn);
    free(qkv);
    free(att);
    free(gu);
    free(abuf);
    free(parts);
    qx_free(&qx);
}
