// GGUF block-quantized CPU kernels, called through ctypes from hearth/kernels/gguf_cpu.py.
//
// Weights stay in their GGUF blocks (rows of K/32 blocks): Q4_0 {f16 d; u8 qs[16]}: w = d*(q-8); Q4_1 {f16 d, m;
// u8 qs[16]}: w = d*q + m; byte j of qs holds value j in its low nibble and value j+16 in its high one. Q8_0 {f16 d;
// i8 qs[32]}: w = d*q. As in llama.cpp, activations are quantized per 32 values to int8 (xd = amax/127,
// xq = round(x/xd)) so that each block's dot product is an integer one (AVX-512 VNNI / AVX-VNNI dpbusd, or AVX2
// maddubs); `xs` = xd * sum(xq) carries the Q4_1 min and the Q4_0 offset.
//
// gguf_gemm: out[m, n] (+)= sum_k x[m, k] * W[n, k], for any M (rows of W split across threads; W read once for up to
// MT rows of x). gguf_dequant: rows -> float32 or bf16, for dense matmuls at prefill sizes.
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

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16); branch-free
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);  // NaN stays NaN
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int64_t gguf_block_bytes(int qtype) {
    switch (qtype) {
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_Q8_0: return 34;
        default: return 0;
    }
}

// ---- activations -> int8 blocks ----

// Per block: q = round(x / d) with d = amax/127; d[b] and s[b] = d * sum(q). `e` (may be NULL) holds the same scales
// expanded for the AVX-512 kernel, per pair of blocks (b, b+1): 8 x d[b], 8 x d[b+1], 8 x s[b]/8, 8 x s[b+1]/8.
static inline void quantize_block(const float *xb, int8_t *q, float *d, float *s, float *e, int64_t b) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        const int v = (int)nearbyintf(xb[j] * id);
        q[j] = (int8_t)v;
        sum += v;
    }
    d[b] = db;
    s[b] = db * (float)sum;
    if (e) {
        float *ep = e + (b / 2) * 32 + (b % 2) * 8;
        for (int j = 0; j < 8; j++) {
            ep[j] = db;
            ep[16 + j] = s[b] * 0.125f;
        }
    }
}

static inline int64_t expanded_len(int64_t K) { return (K / QK + 1) / 2 * 32; }

static void quantize_row_q8(const float *x, int64_t K, int8_t *q, float *d, float *s, float *e) {
    for (int64_t b = 0; b < K / QK; b++) quantize_block(x + b * QK, q + b * QK, d, s, e, b);
}

void gguf_quantize_q8(int64_t M, int64_t K, const float *x, int8_t *q, float *d, float *s) {
    for (int64_t m = 0; m < M; m++) quantize_row_q8(x + m * K, K, q + m * K, d + m * (K / QK), s + m * (K / QK), NULL);
}

// ---- block dot products ----

#if defined(__AVX2__)
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX2__)
// One block of weight row: its int8/uint8 values as a vector, scale d and offset (Q4_1 min, Q4_0 -8d, Q8_0 0).
// For Q8_0 `wv` holds |w| and the signs are moved onto x at the dot (dpbusd multiplies unsigned by signed).
static inline __attribute__((always_inline)) void load_block(const int qtype, const uint8_t *blk, __m256i *wv,
                                                             __m256i *wsign, float *d, float *off) {
    *d = half_to_float(load_u16(blk));
    if (qtype == T_Q8_0) {
        *wsign = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *wv = _mm256_sign_epi8(*wsign, *wsign);
        *off = 0.0f;
        return;
    }
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i q = _mm_loadu_si128((const __m128i *)(blk + (qtype == T_Q4_1 ? 4 : 2)));
    *wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
    *off = qtype == T_Q4_1 ? half_to_float(load_u16(blk + 2)) : -8.0f * *d;
}

// A register tile: R rows of W (n .. n+R) against T rows of x (m0 .. m0+T), over all K/32 blocks. Independent
// accumulators per (row, x row) keep the FMA latency chains apart.
static inline __attribute__((always_inline)) void tile(const int qtype, const int R, const int T, const uint8_t *row0,
                                                       int64_t rb, int64_t nb, int64_t bb, int64_t m0,
                                                       const int8_t *xq, const float *xd, const float *xs, float *out,
                                                       int64_t ldo, int64_t n, int accumulate) {
    __m256 acc[4][2];
    float extra[4][2];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < T; i++) {
            acc[r][i] = _mm256_setzero_ps();
            extra[r][i] = 0.0f;
        }
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[4], ws[4];
        float d[4], off[4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row0 + r * rb + (b + 8) * bb), _MM_HINT_T0);
            load_block(qtype, row0 + r * rb + b * bb, &wv[r], &ws[r], &d[r], &off[r]);
        }
        for (int i = 0; i < T; i++) {
            const int64_t x = (m0 + i) * nb + b;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + x * QK));
            const float dx = xd[x], sx = xs[x];
            for (int r = 0; r < R; r++) {
                const __m256i p = dpbusd(_mm256_setzero_si256(), wv[r], qtype == T_Q8_0 ? _mm256_sign_epi8(xv, ws[r]) : xv);
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[r] * dx), acc[r][i]);
                if (qtype != T_Q8_0) extra[r][i] += off[r] * sx;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < T; i++) {
            const float v = hsum(acc[r][i]) + extra[r][i];
            float *o = out + (m0 + i) * ldo + n + r;
            *o = accumulate ? *o + v : v;
        }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_ZMM 1
// Two consecutive blocks of a weight row as 64 unsigned values (Q8_0: w ^ 0x80 = w + 128, the 128 * sum(x) it adds
// is taken off through the offset), with their scales and offsets spread as 8 lanes each.
static inline __attribute__((always_inline)) void load_pair(const int qtype, const uint8_t *blk, int64_t bb,
                                                            __m512i *wv, __m512 *dv, __m512 *ov) {
    const float d0 = half_to_float(load_u16(blk)), d1 = half_to_float(load_u16(blk + bb));
    float o0, o1;
    if (qtype == T_Q8_0) {
        __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(blk + 2))),
                                       _mm256_loadu_si256((const __m256i *)(blk + bb + 2)), 1);
        *wv = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
        o0 = -128.0f * d0;
        o1 = -128.0f * d1;
    } else {
        const int q = qtype == T_Q4_1 ? 4 : 2;
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256i q2 = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(blk + bb + q)), _mm_loadu_si128((const __m128i *)(blk + q)));
        __m256i lo = _mm256_and_si256(q2, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q2, 4), m4);
        // [blk0 lo | blk0 hi | blk1 lo | blk1 hi] = blk0 values 0..31, blk1 values 0..31
        *wv = _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11),
                                        _mm512_castsi256_si512(hi));
        o0 = qtype == T_Q4_1 ? half_to_float(load_u16(blk + 2)) : -8.0f * d0;
        o1 = qtype == T_Q4_1 ? half_to_float(load_u16(blk + bb + 2)) : -8.0f * d1;
    }
    *dv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(d0)), _mm256_set1_ps(d1), 1);
    *ov = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(o0)), _mm256_set1_ps(o1), 1);
}

// As `tile`, two blocks per step in 512-bit registers: acc += int_dot * (dw * dx) + offset * s/8 per lane
static inline __attribute__((always_inline)) void tile512(const int qtype, const int R, const int T, const uint8_t *row0,
                                                          int64_t rb, int64_t nb, int64_t bb, int64_t m0, int64_t K,
                                                          const int8_t *xq, const float *xd, const float *xs,
                                                          const float *xe, float *out, int64_t ldo, int64_t n,
                                                          int accumulate) {
    __m512 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < T; i++) acc[r][i] = _mm512_setzero_ps();
    const int64_t ne = expanded_len(K);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i wv[4];
        __m512 dv[4], ov[4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row0 + r * rb + (b + 8) * bb), _MM_HINT_T0);
            load_pair(qtype, row0 + r * rb + b * bb, bb, &wv[r], &dv[r], &ov[r]);
        }
        for (int i = 0; i < T; i++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq + (m0 + i) * K + b * QK));
            const float *e = xe + (m0 + i) * ne + (b / 2) * 32;
            const __m512 dx = _mm512_loadu_ps(e), sx = _mm512_loadu_ps(e + 16);
            for (int r = 0; r < R; r++) {
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dv[r], dx), acc[r][i]);
                acc[r][i] = _mm512_fmadd_ps(ov[r], sx, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < T; i++) {
            float v = _mm512_reduce_add_ps(acc[r][i]);
            if (b < nb) {  // an odd last block
                __m256i wv, ws;
                float d, off;
                load_block(qtype, row0 + r * rb + b * bb, &wv, &ws, &d, &off);
                const int64_t x = (m0 + i) * nb + b;
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (m0 + i) * K + b * QK));
                const __m256i p = dpbusd(_mm256_setzero_si256(), wv, qtype == T_Q8_0 ? _mm256_sign_epi8(xv, ws) : xv);
                v += hsum(_mm256_cvtepi32_ps(p)) * d * xd[x] + off * xs[x];
            }
            float *o = out + (m0 + i) * ldo + n + r;
            *o = accumulate ? *o + v : v;
        }
}
#endif

static inline __attribute__((always_inline)) void gemm_rows_t(const int qtype, const uint8_t *w, int64_t K, int64_t n0,
                                                              int64_t n1, int64_t M, const int8_t *xq, const float *xd,
                                                              const float *xs, const float *xe, float *out, int64_t ldo,
                                                              int accumulate) {
    const int64_t nb = K / QK, bb = gguf_block_bytes(qtype), rb = nb * bb;
    int64_t n = n0;
#ifdef HAVE_ZMM
    if (xe) {
        for (; n + 4 <= n1; n += 4) {
            int64_t m0 = 0;
            for (; m0 + 2 <= M; m0 += 2)
                tile512(qtype, 4, 2, w + n * rb, rb, nb, bb, m0, K, xq, xd, xs, xe, out, ldo, n, accumulate);
            if (m0 < M) tile512(qtype, 4, 1, w + n * rb, rb, nb, bb, m0, K, xq, xd, xs, xe, out, ldo, n, accumulate);
        }
        for (; n < n1; n++)
            for (int64_t m0 = 0; m0 < M; m0++)
                tile512(qtype, 1, 1, w + n * rb, rb, nb, bb, m0, K, xq, xd, xs, xe, out, ldo, n, accumulate);
        return;
    }
#endif
    (void)xe;
    for (; n + 4 <= n1; n += 4) {
        int64_t m0 = 0;
        for (; m0 + 2 <= M; m0 += 2) tile(qtype, 4, 2, w + n * rb, rb, nb, bb, m0, xq, xd, xs, out, ldo, n, accumulate);
        if (m0 < M) tile(qtype, 4, 1, w + n * rb, rb, nb, bb, m0, xq, xd, xs, out, ldo, n, accumulate);
    }
    for (; n < n1; n++)
        for (int64_t m0 = 0; m0 < M; m0++) tile(qtype, 1, 1, w + n * rb, rb, nb, bb, m0, xq, xd, xs, out, ldo, n, accumulate);
}
#endif

// out[m * ldo + n] (+)= W[n] . x[m] for n in [n0, n1), m in [0, M)
// x: int8 rows of K values (xq), per-block scales (xd), offsets (xs), and the expanded form of both (xe, optional)
static void gemm_rows(int qtype, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, int64_t M, const int8_t *xq,
                      const float *xd, const float *xs, const float *xe, float *out, int64_t ldo, int accumulate) {
#if defined(__AVX2__)
    switch (qtype) {
        case T_Q4_0: gemm_rows_t(T_Q4_0, w, K, n0, n1, M, xq, xd, xs, xe, out, ldo, accumulate); return;
        case T_Q4_1: gemm_rows_t(T_Q4_1, w, K, n0, n1, M, xq, xd, xs, xe, out, ldo, accumulate); return;
        default: gemm_rows_t(T_Q8_0, w, K, n0, n1, M, xq, xd, xs, xe, out, ldo, accumulate); return;
    }
#else
    (void)xe;
    const int64_t nb = K / QK, bb = gguf_block_bytes(qtype), rb = nb * bb;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rb;
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f, extra = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * bb;
                const float d = half_to_float(load_u16(blk));
                int8_t wq[QK];
                float off = 0.0f;
                if (qtype == T_Q8_0) {
                    memcpy(wq, blk + 2, QK);
                } else {
                    const uint8_t *qs = blk + (qtype == T_Q4_1 ? 4 : 2);
                    off = qtype == T_Q4_1 ? half_to_float(load_u16(blk + 2)) : -8.0f * d;
                    for (int j = 0; j < 16; j++) {
                        wq[j] = (int8_t)(qs[j] & 15);
                        wq[j + 16] = (int8_t)(qs[j] >> 4);
                    }
                }
                const int64_t r = m * nb + b;
                int dot = 0;
                for (int j = 0; j < QK; j++) dot += wq[j] * xq[r * QK + j];
                acc += (float)dot * d * xd[r];
                extra += off * xs[r];
            }
            float *o = out + m * ldo + n;
            *o = accumulate ? *o + acc + extra : acc + extra;
        }
    }
#endif
}

// rows [n0, n1) of this thread's share of N (contiguous chunks, so each thread streams its own part of W)
static inline void thread_range(int64_t N, int tid, int nth, int64_t *n0, int64_t *n1) {
    int64_t per = (N + nth - 1) / nth;
    *n0 = tid * per < N ? tid * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

#ifdef _OPENMP
#include <omp.h>
#define TID omp_get_thread_num()
#define NTH omp_get_num_threads()
#else
#define TID 0
#define NTH 1
#endif

// Quantized activations: M rows of K values, as gemm_rows reads them (sized for the largest K they will hold).
typedef struct {
    int8_t *q;
    float *d, *s, *e;
    int64_t K;
} QX;

static QX qx_alloc(int64_t M, int64_t kmax) {
    QX x = {malloc((size_t)(M * kmax)), malloc(sizeof(float) * (size_t)(M * kmax / QK)),
            malloc(sizeof(float) * (size_t)(M * kmax / QK)), malloc(sizeof(float) * (size_t)(M * expanded_len(kmax))), 0};
    return x;
}

static void qx_free(QX *x) {
    free(x->q);
    free(x->d);
    free(x->s);
    free(x->e);
}

// block (m, b) of x [M, K] (row stride ldx) into the QX as a K-wide matrix
static inline void qx_block(QX *x, const float *src, int64_t ldx, int64_t K, int64_t m, int64_t b) {
    const int64_t nb = K / QK;
    quantize_block(src + m * ldx + b * QK, x->q + m * K + b * QK, x->d + m * nb, x->s + m * nb, x->e + m * expanded_len(K), b);
}

static inline void qx_gemm(const QX *x, int64_t M, int qtype, const uint8_t *w, int64_t n0, int64_t n1, float *out,
                           int64_t ldo, int accumulate) {
    gemm_rows(qtype, w, x->K, n0, n1, M, x->q, x->d, x->s, x->e, out, ldo, accumulate);
}

void gguf_gemm(int64_t M, int64_t N, int64_t K, int qtype, const uint8_t *w, const float *x, float *out,
               int accumulate, int nthreads) {
    QX qx = qx_alloc(M, K);
    qx.K = K;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * (K / QK); i++) qx_block(&qx, x, K, K, i / (K / QK), i % (K / QK));
        int64_t n0, n1;
        thread_range(N, TID, NTH, &n0, &n1);
        qx_gemm(&qx, M, qtype, w, n0, n1, out, N, accumulate);
    }
    qx_free(&qx);
}

// one block of a weight row -> 32 floats (exact: d * q + m in float32)
static inline void dequant_block(int qtype, const uint8_t *blk, float *row) {
    const float d = half_to_float(load_u16(blk));
    if (qtype == T_Q8_0) {
        for (int j = 0; j < QK; j++) row[j] = d * (float)(int8_t)blk[2 + j];
    } else if (qtype == T_Q4_1) {
        const float m = half_to_float(load_u16(blk + 2));
        for (int j = 0; j < 16; j++) {
            row[j] = d * (float)(blk[4 + j] & 15) + m;
            row[j + 16] = d * (float)(blk[4 + j] >> 4) + m;
        }
    } else {
        for (int j = 0; j < 16; j++) {
            row[j] = d * (float)((blk[2 + j] & 15) - 8);
            row[j + 16] = d * (float)((blk[2 + j] >> 4) - 8);
        }
    }
}

// rows of W -> float32 (out_bf16 = 0) or bf16 (out_bf16 = 1), [N, K]
void gguf_dequant(int64_t N, int64_t K, int qtype, const uint8_t *w, void *out, int out_bf16, int nthreads) {
    const int64_t nb = K / QK, bb = gguf_block_bytes(qtype);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float row[QK];
        for (int64_t b = 0; b < nb; b++) {
            dequant_block(qtype, w + (n * nb + b) * bb, row);
            const int64_t o = n * K + b * QK;
            if (out_bf16)
                for (int j = 0; j < QK; j++) ((uint16_t *)out)[o + j] = float_to_bf16(row[j]);
            else
                memcpy((float *)out + o, row, sizeof(row));
        }
    }
}

// out[m, n] = sum_k x[m, k] * W[n, k] for a few rows of float x (M <= 16), W dequantized and rounded to bf16, products
// summed in float32: the arithmetic of the dense bf16 matmul on the dequantized weight (in another order), without
// materialising the weight.
#define F32_MAX_M 16
void gguf_gemm_f32(int64_t M, int64_t N, int64_t K, int qtype, const uint8_t *w, const float *x, float *out,
                   int nthreads) {
    const int64_t nb = K / QK, bb = gguf_block_bytes(qtype);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * nb * bb;
        float wf[QK];
#if defined(__AVX512F__)
        __m512 acc[F32_MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            _mm_prefetch((const char *)(row + (b + 8) * bb), _MM_HINT_T0);
            dequant_block(qtype, row + b * bb, wf);
            for (int j = 0; j < QK; j++) wf[j] = bf16_to_float(float_to_bf16(wf[j]));
            const __m512 w0 = _mm512_loadu_ps(wf), w1 = _mm512_loadu_ps(wf + 16);
            for (int64_t m = 0; m < M; m++) {
                const float *xb = x + m * K + b * QK;
                acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[m]);
                acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) out[m * N + n] = _mm512_reduce_add_ps(acc[m]);
#else
        float acc[F32_MAX_M][QK];
        memset(acc, 0, sizeof(acc));
        for (int64_t b = 0; b < nb; b++) {
            dequant_block(qtype, row + b * bb, wf);
            for (int j = 0; j < QK; j++) wf[j] = bf16_to_float(float_to_bf16(wf[j]));
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < QK; j++) acc[m][j] += wf[j] * x[m * K + b * QK + j];
        }
        for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += acc[m][j];
            out[m * N + n] = s;
        }
#endif
    }
}

// ---- a Llama-family decode step ----

typedef struct {
    const float *input_norm, *post_norm;                 // [H]
    const uint8_t *qkv, *o, *gate_up, *down;             // GGUF rows: [(Hq+2Hkv)*D, H], [H, Hq*D], [2I, H], [H, I]
    int qkv_type, o_type, gate_up_type, down_type;
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
    const uint8_t *lm_head;      // [V, H] GGUF rows, or NULL (then logits are not computed)
    int lm_head_type;
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

// bf16 x[0..d) -> float, and dot products / axpy against float vectors (d a multiple of 16 on the AVX-512 path)
#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif



// Decode attention, flash-decoding style: a task is one sequence, one KV head (all G query heads that share it, so
// each key and value is read once) and one chunk of ATT_CHUNK keys; it leaves, per query head, its chunk's max
// score, sum of exp and unnormalised output. `merge_heads` then combines the chunks.
#define ATT_CHUNK 128
#define MAX_GROUP 16

static inline float dot_f32(const float *a, const float *b, int64_t d) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int64_t i = 16; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline void bf16_row(const uint16_t *src, float *dst, int64_t d) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        for (int64_t i = 0; i < d; i += 16) _mm512_storeu_ps(dst + i, load_bf16x16(src + i));
        return;
    }
#endif
    for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_float(src[i]);
}

// the n rows of d bf16 values at `p`, `stride` apart, towards L1 (the next cache block while this one is computed)
static inline void prefetch_rows(const uint16_t *p, int64_t n, int64_t stride, int64_t d) {
#if defined(__AVX2__)
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < d; i += 32) _mm_prefetch((const char *)(p + r * stride + i), _MM_HINT_T0);
#else
    (void)p, (void)n, (void)stride, (void)d;
#endif
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 (softmax weights): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6 Taylor polynomial
// (relative error < 2e-7); below -87 the result is ~1e-38, as good as 0 next to the row's largest weight, 1.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// attend_chunk for a head size D and JG query heads known at compile time: keys, values and outputs in registers
static inline __attribute__((always_inline)) void attend_chunk_d(const int D, const int JG, const float *q,
                                                                 const uint16_t *kc, const uint16_t *vc,
                                                                 const int64_t *table, int64_t bs, int64_t t_begin,
                                                                 int64_t t_end, int64_t stride, float scale,
                                                                 float *scores, float *part) {
    __m512 qv[4][8], o[4][8];
    float mx[4], sum[4];
    for (int j = 0; j < JG; j++) {
        mx[j] = -INFINITY;
        for (int i = 0; i < D / 16; i++) {
            qv[j][i] = _mm512_mul_ps(_mm512_loadu_ps(q + j * D + 16 * i), _mm512_set1_ps(scale));
            o[j][i] = _mm512_setzero_ps();
        }
    }
    const int64_t n = t_end - t_begin;
    for (int64_t b0 = t_begin - t_begin % bs; b0 < t_end; b0 += bs) {
        const int64_t a = b0 > t_begin ? b0 : t_begin, e = b0 + bs < t_end ? b0 + bs : t_end;
        const uint16_t *kb = kc + (table[b0 / bs] * bs - b0) * stride;
        for (int64_t t = a; t < e; t++) {
            __m512 kv[8];
            for (int i = 0; i < D / 16; i++) kv[i] = load_bf16x16(kb + t * stride + 16 * i);
            for (int j = 0; j < JG; j++) {
                __m512 acc = _mm512_mul_ps(qv[j][0], kv[0]);
                for (int i = 1; i < D / 16; i++) acc = _mm512_fmadd_ps(qv[j][i], kv[i], acc);
                const float sc = _mm512_reduce_add_ps(acc);
                scores[j * ATT_CHUNK + t - t_begin] = sc;
                mx[j] = sc > mx[j] ? sc : mx[j];
            }
        }
    }
    for (int j = 0; j < JG; j++) {
        float *sj = scores + j * ATT_CHUNK;
        const __m512 m = _mm512_set1_ps(mx[j]);
        __m512 acc = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= n; t += 16) {
            const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sj + t), m));
            _mm512_storeu_ps(sj + t, p);
            acc = _mm512_add_ps(acc, p);
        }
        if (t < n) {
            const __mmask16 k = (__mmask16)((1u << (n - t)) - 1);
            const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sj + t), m));
            _mm512_mask_storeu_ps(sj + t, k, p);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, p));
        }
        sum[j] = _mm512_reduce_add_ps(acc);
    }
    for (int64_t b0 = t_begin - t_begin % bs; b0 < t_end; b0 += bs) {
        const int64_t a = b0 > t_begin ? b0 : t_begin, e = b0 + bs < t_end ? b0 + bs : t_end;
        const uint16_t *vb = vc + (table[b0 / bs] * bs - b0) * stride;
        for (int64_t t = a; t < e; t++) {
            __m512 vv[8];
            for (int i = 0; i < D / 16; i++) vv[i] = load_bf16x16(vb + t * stride + 16 * i);
            for (int j = 0; j < JG; j++) {
                const __m512 p = _mm512_set1_ps(scores[j * ATT_CHUNK + t - t_begin]);
                for (int i = 0; i < D / 16; i++) o[j][i] = _mm512_fmadd_ps(p, vv[i], o[j][i]);
            }
        }
    }
    for (int j = 0; j < JG; j++) {
        part[j * (2 + D)] = mx[j];
        part[j * (2 + D) + 1] = sum[j];
        for (int i = 0; i < D / 16; i++) _mm512_storeu_ps(part + j * (2 + D) + 2 + 16 * i, o[j][i]);
    }
}
#endif

// part: G x (2 + d) floats: max, sum, o[d]. q: the G query heads (contiguous, d each); buf: the thread's scratch,
// G * ATT_CHUNK + d + G * d floats (outputs accumulate there, not in `part`, which neighbours other threads' parts).
static void attend_chunk(const float *q, int64_t G, const uint16_t *kc, const uint16_t *vc, const int64_t *table,
                         int64_t bs, int64_t t_begin, int64_t t_end, int64_t stride, int64_t d, float scale, float *buf,
                         float *part) {
#if defined(__AVX512F__)
    // heads in register-sized groups: 4 at a time for d = 64, 2 for d = 128 (16 output registers)
    if (d == 64 || d == 128) {
        const int64_t per = d == 64 ? 4 : 2;
        for (int64_t j0 = 0; j0 < G; j0 += per) {
            const int64_t jg = G - j0 < per ? G - j0 : per;
            const float *qj = q + j0 * d;
            float *pj = part + j0 * (2 + d);
            if (d == 64) {
                if (jg == 4) attend_chunk_d(64, 4, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
                else if (jg == 3) attend_chunk_d(64, 3, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
                else if (jg == 2) attend_chunk_d(64, 2, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
                else attend_chunk_d(64, 1, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
            } else {
                if (jg == 2) attend_chunk_d(128, 2, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
                else attend_chunk_d(128, 1, qj, kc, vc, table, bs, t_begin, t_end, stride, scale, buf, pj);
            }
        }
        return;
    }
#endif
    float *scores = buf, *row = buf + G * ATT_CHUNK, *acc_o = row + d;
    float mx[MAX_GROUP], sum[MAX_GROUP];
    for (int64_t j = 0; j < G; j++) mx[j] = -INFINITY;
    // keys block by block of the block table (no division per key)
    for (int64_t b0 = t_begin - t_begin % bs; b0 < t_end; b0 += bs) {
        const int64_t a = b0 > t_begin ? b0 : t_begin, e = b0 + bs < t_end ? b0 + bs : t_end;
        const uint16_t *kb = kc + (table[b0 / bs] * bs - b0) * stride;
        if (b0 + bs < t_end) prefetch_rows(kc + table[b0 / bs + 1] * bs * stride, bs, stride, d);
        for (int64_t t = a; t < e; t++) {
            bf16_row(kb + t * stride, row, d);
            for (int64_t j = 0; j < G; j++) {
                const float sc = dot_f32(q + j * d, row, d) * scale;
                scores[j * ATT_CHUNK + t - t_begin] = sc;
                mx[j] = sc > mx[j] ? sc : mx[j];
            }
        }
    }
    for (int64_t j = 0; j < G; j++) {
        float *sj = scores + j * ATT_CHUNK, acc = 0.0f;
        for (int64_t t = 0; t < t_end - t_begin; t++) {
            sj[t] = expf(sj[t] - mx[j]);
            acc += sj[t];
        }
        sum[j] = acc;
        for (int64_t i = 0; i < d; i++) acc_o[j * d + i] = 0.0f;
    }
    for (int64_t b0 = t_begin - t_begin % bs; b0 < t_end; b0 += bs) {
        const int64_t a = b0 > t_begin ? b0 : t_begin, e = b0 + bs < t_end ? b0 + bs : t_end;
        const uint16_t *vb = vc + (table[b0 / bs] * bs - b0) * stride;
        if (b0 + bs < t_end) prefetch_rows(vc + table[b0 / bs + 1] * bs * stride, bs, stride, d);
        for (int64_t t = a; t < e; t++) {
            bf16_row(vb + t * stride, row, d);
            for (int64_t j = 0; j < G; j++) {
                const float p = scores[j * ATT_CHUNK + t - t_begin];
                float *restrict o = acc_o + j * d;
                for (int64_t i = 0; i < d; i++) o[i] += p * row[i];
            }
        }
    }
    for (int64_t j = 0; j < G; j++) {
        part[j * (2 + d)] = mx[j];
        part[j * (2 + d) + 1] = sum[j];
        memcpy(part + j * (2 + d) + 2, acc_o + j * d, sizeof(float) * (size_t)d);
    }
}

// out[d] of one query head from its nc chunk partials (each `pstride` floats apart)
static void merge_heads(const float *part, int64_t nc, int64_t pstride, int64_t d, float *out) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < nc; c++) mx = part[c * pstride] > mx ? part[c * pstride] : mx;
    float denom = 0.0f;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t c = 0; c < nc; c++) {
        const float *pc = part + c * pstride, w = expf(pc[0] - mx);
        denom += pc[1] * w;
        for (int64_t i = 0; i < d; i++) out[i] += w * pc[2 + i];
    }
    const float inv = 1.0f / denom;
    for (int64_t i = 0; i < d; i++) out[i] *= inv;
}

// h: [M, H] float32 embeddings in, final-normed hidden states out; logits: [M, V] when the model has an LM head.
// positions, context_lens: [M]; block_tables: [M, max_blocks]; the new token of row m goes to slot_mapping[m].
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
    const int64_t G = Hq / Hkv, nchunks = (max_len + ATT_CHUNK - 1) / ATT_CHUNK, pstride = G * (2 + D);
    float *abuf = malloc(sizeof(float) * (size_t)(nthreads * (G * ATT_CHUNK + D + G * D)));
    float *parts = malloc(sizeof(float) * (size_t)(M * Hkv * nchunks * pstride));
    QX qx = qx_alloc(M, kmax);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = TID, nth = NTH;
        QX lx = qx;  // this thread's view: the buffers are shared, the row width K is set per matmul
        int64_t n0, n1;
        for (int64_t l = 0; l < mw->num_layers; l++) {
            const LayerWeights *L = &mw->layers[l];
            // attention block: xn = norm(h) -> int8; qkv = xn W^T (+ b)
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->input_norm, mw->eps, H, xn + m * H);
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
            thread_range(nqkv, tid, nth, &n0, &n1);
            qx_gemm(&lx, M, L->qkv_type, L->qkv, n0, n1, qkv, nqkv, 0);
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
#pragma omp for schedule(dynamic)
            for (int64_t i = 0; i < M * Hkv * nchunks; i++) {
                const int64_t m = i / (Hkv * nchunks), g = i / nchunks % Hkv, c = i % nchunks, len = context_lens[m];
                const int64_t start = L->window > 0 && len > L->window ? len - L->window : 0;
                const int64_t t0 = start + c * ATT_CHUNK, t1 = t0 + ATT_CHUNK < len ? t0 + ATT_CHUNK : len;
                if (t0 < t1)
                    attend_chunk(qkv + m * nqkv + g * G * D, G, L->k_cache + g * D, L->v_cache + g * D,
                                 block_tables + m * max_blocks, block_size, t0, t1, kvsz, D, mw->scale,
                                 abuf + tid * (G * ATT_CHUNK + D + G * D), parts + i * pstride);
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * Hq; i++) {
                const int64_t m = i / Hq, hh = i % Hq, g = hh / G, len = context_lens[m];
                const int64_t start = L->window > 0 && len > L->window ? len - L->window : 0;
                const int64_t nc = (len - start + ATT_CHUNK - 1) / ATT_CHUNK;
                merge_heads(parts + (m * Hkv + g) * nchunks * pstride + (hh % G) * (2 + D), nc, pstride, D,
                            att + m * qsz + hh * D);
            }
            lx.K = qsz;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (qsz / QK); i++) qx_block(&lx, att, qsz, qsz, i / (qsz / QK), i % (qsz / QK));
            thread_range(H, tid, nth, &n0, &n1);
            qx_gemm(&lx, M, L->o_type, L->o, n0, n1, h, H, 1);  // h += attn W_o^T
#pragma omp barrier
            // MLP block: h += down(silu(gate) * up)
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->post_norm, mw->eps, H, xn + m * H);
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
            thread_range(2 * I, tid, nth, &n0, &n1);
            qx_gemm(&lx, M, L->gate_up_type, L->gate_up, n0, n1, gu, 2 * I, 0);
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
            thread_range(H, tid, nth, &n0, &n1);
            qx_gemm(&lx, M, L->down_type, L->down, n0, n1, h, H, 1);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            rms_norm(h + m * H, mw->final_norm, mw->eps, H, xn + m * H);
            memcpy(h + m * H, xn + m * H, sizeof(float) * (size_t)H);
        }
        if (mw->lm_head && logits) {
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, h, H, H, i / (H / QK), i % (H / QK));
            thread_range(mw->vocab, tid, nth, &n0, &n1);
            qx_gemm(&lx, M, mw->lm_head_type, mw->lm_head, n0, n1, logits, mw->vocab, 0);
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
