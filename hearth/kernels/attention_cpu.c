// Causal (optionally sliding-window) prefill attention on bf16 q/k/v, flash-attention style, called through ctypes
// from hearth/kernels/attention_cpu.py.
//
// attn_prefill: out[i, h] = softmax_j(scale * q[i, h] . k[j, h/G]) v[j, h/G] over the keys j with
// q0 + i - window < j <= q0 + i (no lower bound when window == 0), G = H / Hkv query heads per KV head.
// With `sinks` (H floats, or NULL) head h's softmax denominator gains exp(sinks[h]): a logit with no value. The
// running max starts at the sink, so exp(sink - max) <= 1 is added once at the end.
// K and V of each KV head are first repacked (zero-padded to a multiple of KC keys):
//   Kp[16-key group][dim pair][16 keys][2 dims]  -> one vdpbf16ps gives 16 keys' partial dots over 2 dims;
//   Vp[key pair][D dims][2 keys]                 -> one vdpbf16ps adds 2 keys' weighted values to 16 output dims.
// Work items are (KV head, block of queries); the G query heads of a block share each K/V load. Per chunk of KC
// keys: scores S = Q K^T in float32, online softmax in float32 (running max, lane-wise running sum), P rounded to
// bf16 for P V (as torch's CPU flash kernel does for bf16), O accumulated in float32, rounded to bf16 once at the end.
// Chunks no query of the block may see are skipped; items run longest first (dynamic schedule) to balance the
// causal triangle over threads.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "kernel_common.h"
#include "paged_attention.h"

int attn_prefill_fast(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)

#define KC 32      // keys per chunk
#define ROWS 48    // target query rows (queries x heads of the group) per work item
#define MAXR 64    // rows per item at most (padded to a multiple of 4)
#define MAXD 128

static inline __m512bh bcast32(const uint16_t *p) {  // one pair of bf16 values in every 32-bit lane
    int32_t x;
    memcpy(&x, p, 4);
    return (__m512bh)_mm512_set1_epi32(x);
}

// S[r][0..KC) = Q[r] . K[j0 + 0..KC) for 4 rows at a time; D known at compile time
static inline __attribute__((always_inline)) void scores_d(const int D, const uint16_t *qloc, int rows,
                                                           const uint16_t *kp, float *S) {
    for (int r = 0; r < rows; r += 4) {
        __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps(), a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps();
        __m512 a20 = _mm512_setzero_ps(), a21 = _mm512_setzero_ps(), a30 = _mm512_setzero_ps(), a31 = _mm512_setzero_ps();
        const uint16_t *q = qloc + (size_t)r * D;
        for (int d2 = 0; d2 < D / 2; d2++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + (size_t)d2 * 32);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + (size_t)(D / 2 + d2) * 32);
            __m512bh b = bcast32(q + 2 * d2);
            a00 = _mm512_dpbf16_ps(a00, k0, b), a01 = _mm512_dpbf16_ps(a01, k1, b);
            b = bcast32(q + D + 2 * d2);
            a10 = _mm512_dpbf16_ps(a10, k0, b), a11 = _mm512_dpbf16_ps(a11, k1, b);
            b = bcast32(q + 2 * D + 2 * d2);
            a20 = _mm512_dpbf16_ps(a20, k0, b), a21 = _mm512_dpbf16_ps(a21, k1, b);
            b = bcast32(q + 3 * D + 2 * d2);
            a30 = _mm512_dpbf16_ps(a30, k0, b), a31 = _mm512_dpbf16_ps(a31, k1, b);
        }
        float *s = S + (size_t)r * KC;
        _mm512_storeu_ps(s, a00), _mm512_storeu_ps(s + 16, a01);
        _mm512_storeu_ps(s + KC, a10), _mm512_storeu_ps(s + KC + 16, a11);
        _mm512_storeu_ps(s + 2 * KC, a20), _mm512_storeu_ps(s + 2 * KC + 16, a21);
        _mm512_storeu_ps(s + 3 * KC, a30), _mm512_storeu_ps(s + 3 * KC + 16, a31);
    }
}

// O[r][0..D) = O[r] * alpha[r] + P[r] . V[j0 + 0..KC), 4 rows x 64 dims at a time
static inline __attribute__((always_inline)) void pv_d(const int D, const uint16_t *P, const float *alpha, int rows,
                                                       const uint16_t *vp, float *O) {
    for (int db = 0; db < D; db += 64) {
        for (int r = 0; r < rows; r += 4) {
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++) {
                const __m512 al = _mm512_set1_ps(alpha[r + i]);
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(O + (size_t)(r + i) * D + db + 16 * c), al);
            }
            for (int kp = 0; kp < KC / 2; kp++) {
                const uint16_t *v = vp + ((size_t)kp * D + db) * 2;
                __m512bh vv[4];
                for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_loadu_si512(v + 32 * c);
                for (int i = 0; i < 4; i++) {
                    const __m512bh b = bcast32(P + (size_t)(r + i) * KC + 2 * kp);
                    for (int c = 0; c < 4; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], vv[c], b);
                }
            }
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(O + (size_t)(r + i) * D + db + 16 * c, acc[i][c]);
        }
    }
}

static void repack(int64_t L, int64_t Lpad, int64_t Hkv, int64_t D, const uint16_t *k, int64_t k_stride,
                   const uint16_t *v, int64_t v_stride, uint16_t *kp, uint16_t *vp, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) collapse(2)
    for (int64_t g = 0; g < Hkv; g++) {
        for (int64_t c = 0; c < Lpad / 16; c++) {
            uint32_t *kd = (uint32_t *)(kp + (g * Lpad + c * 16) * D);  // [D/2][16] pairs
            uint16_t *vd = vp + (g * Lpad + c * 16) * D;                // [8 key pairs][D][2]
            for (int kk = 0; kk < 16; kk++) {
                const int64_t j = c * 16 + kk;
                if (j < L) {
                    const uint16_t *kr = k + j * k_stride + g * D, *vr = v + j * v_stride + g * D;
                    for (int d2 = 0; d2 < D / 2; d2++) memcpy(kd + d2 * 16 + kk, kr + 2 * d2, 4);
                    for (int d = 0; d < D; d++) vd[((kk >> 1) * D + d) * 2 + (kk & 1)] = vr[d];
                } else {
                    for (int d2 = 0; d2 < D / 2; d2++) kd[d2 * 16 + kk] = 0;
                    for (int d = 0; d < D; d++) vd[((kk >> 1) * D + d) * 2 + (kk & 1)] = 0;
                }
            }
        }
    }
}

#endif

// q: [n, H, D] rows q_stride apart; k, v: [L, Hkv, D] rows k_stride / v_stride apart; out: [n, H, D] rows o_stride
// apart (all strides in elements; heads D apart, dims contiguous). Query i sits at key index q0 + i = L - n + i.
// Returns 0 when the shape is not supported (the caller raises).
int attn_prefill(int64_t n, int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t q0, int64_t window, float scale,
                 const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                 int64_t v_stride, uint16_t *out, int64_t o_stride, const float *sinks, int nthreads) {
#if defined(__AVX512BF16__)
    const int64_t G = H / Hkv;
    if ((D != 64 && D != 128) || G * Hkv != H || G > MAXR / 4 || n <= 0 || n > L) return 0;
    int64_t bq = ROWS / G;
    if (bq < 1) bq = 1;
    const int64_t Lpad = (L + KC - 1) / KC * KC, nblocks = (n + bq - 1) / bq, items = nblocks * Hkv;
    uint16_t *kp = aligned_alloc(64, (size_t)(Hkv * Lpad * D * 2)), *vp = aligned_alloc(64, (size_t)(Hkv * Lpad * D * 2));
    if (!kp || !vp) {
        free(kp), free(vp);
        return 0;
    }
    repack(L, Lpad, Hkv, D, k, k_stride, v, v_stride, kp, vp, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t qloc[MAXR * MAXD] __attribute__((aligned(64)));
        uint16_t P[MAXR * KC] __attribute__((aligned(64)));
        float S[MAXR * KC] __attribute__((aligned(64)));
        float O[MAXR * MAXD] __attribute__((aligned(64)));
        float m[MAXR], alpha[MAXR];
        __m512 lsum[MAXR];
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t qb = nblocks - 1 - it / Hkv, g = it % Hkv;  // last query blocks (most keys) first
            const int64_t i0 = qb * bq, nq = n - i0 < bq ? n - i0 : bq, rows = nq * G, rows4 = (rows + 3) & ~3;
            for (int64_t r = 0; r < rows4; r++) {
                if (r < rows) memcpy(qloc + r * D, q + (i0 + r / G) * q_stride + (g * G + r % G) * D, D * 2);
                else memset(qloc + r * D, 0, D * 2);
                m[r] = sinks && r < rows ? sinks[g * G + r % G] : -INFINITY, lsum[r] = _mm512_setzero_ps();
                memset(O + r * D, 0, D * 4);
            }
            const int64_t pmin = q0 + i0, pmax = q0 + i0 + nq - 1;  // key index of the block's first / last query
            const int64_t jlo = window > 0 && pmin - window + 1 > 0 ? pmin - window + 1 : 0;
            const int64_t jhi = pmax < L - 1 ? pmax : L - 1;
            const uint16_t *kg = kp + g * Lpad * D, *vg = vp + g * Lpad * D;
            const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            for (int64_t j0 = jlo / KC * KC; j0 <= jhi; j0 += KC) {
                if (D == 64) scores_d(64, qloc, rows4, kg + j0 * D, S);
                else scores_d(128, qloc, rows4, kg + j0 * D, S);
                const int need_mask = j0 + KC - 1 > pmin || (window > 0 && j0 <= pmax - window);
                for (int64_t r = 0; r < rows4; r++) {
                    const int64_t p = r < rows ? pmin + r / G : pmax;
                    __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(S + r * KC), _mm512_set1_ps(scale));
                    __m512 s1 = _mm512_mul_ps(_mm512_loadu_ps(S + r * KC + 16), _mm512_set1_ps(scale));
                    __mmask16 v0 = 0xffff, v1 = 0xffff;
                    if (need_mask) {  // valid: lo <= j <= p, as offsets from j0
                        const int64_t lo = window > 0 ? p - window + 1 : INT32_MIN;
                        const __m512i hi_v = _mm512_set1_epi32((int32_t)(p - j0));
                        const __m512i lo_v = _mm512_set1_epi32((int32_t)(lo - j0 < INT32_MIN ? INT32_MIN : lo - j0));
                        const __m512i l1 = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
                        v0 = _mm512_cmple_epi32_mask(lane, hi_v) & _mm512_cmpge_epi32_mask(lane, lo_v);
                        v1 = _mm512_cmple_epi32_mask(l1, hi_v) & _mm512_cmpge_epi32_mask(l1, lo_v);
                        s0 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), v0, s0);
                        s1 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), v1, s1);
                    }
                    const float cmax = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
                    const float mnew = cmax > m[r] ? cmax : m[r];
                    if (mnew == -INFINITY) {  // nothing visible yet for this row
                        alpha[r] = 1.0f;
                        memset(P + r * KC, 0, KC * 2);
                        continue;
                    }
                    alpha[r] = expf(m[r] - mnew);
                    m[r] = mnew;
                    const __m512 mv = _mm512_set1_ps(mnew);
                    const __m512 p0 = _mm512_maskz_mov_ps(v0, exp512(_mm512_sub_ps(s0, mv)));
                    const __m512 p1 = _mm512_maskz_mov_ps(v1, exp512(_mm512_sub_ps(s1, mv)));
                    lsum[r] = _mm512_fmadd_ps(lsum[r], _mm512_set1_ps(alpha[r]), _mm512_add_ps(p0, p1));
                    _mm512_storeu_si512(P + r * KC, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
                }
                if (D == 64) pv_d(64, P, alpha, rows4, vg + j0 * D, O);
                else pv_d(128, P, alpha, rows4, vg + j0 * D, O);
            }
            for (int64_t r = 0; r < rows; r++) {
                const float sink = sinks ? expf(sinks[g * G + r % G] - m[r]) : 0.0f;
                const float inv = 1.0f / (_mm512_reduce_add_ps(lsum[r]) + sink);
                uint16_t *o = out + (i0 + r / G) * o_stride + (g * G + r % G) * D;
                for (int64_t d = 0; d < D; d++) o[d] = float_to_bf16(O[r * D + d] * inv);
            }
        }
    }
    free(kp), free(vp);
    return 1;
#else
    (void)n, (void)H, (void)Hkv, (void)D, (void)L, (void)q0, (void)window, (void)scale, (void)q, (void)q_stride;
    (void)k, (void)k_stride, (void)v, (void)v_stride, (void)out, (void)o_stride, (void)sinks, (void)nthreads;
    return 0;
#endif
}

// attn_decode: out[m] = attention of M single query tokens q[m] (Hq x D float32 each) over their sequences' keys in
// the paged bf16 cache kc/vc [blocks, bs, Hkv, D] (decode_attention in paged_attention.h); out float32 [M, Hq, D].
// sinks: Hq floats (a value-less logit per head in the softmax denominator) or NULL.
void attn_decode(int64_t M, int64_t Hq, int64_t Hkv, int64_t D, const float *q, const uint16_t *kc, const uint16_t *vc,
                 const int64_t *tables, int64_t max_blocks, int64_t bs, const int64_t *lens, int64_t window, float scale,
                 const float *sinks, float *out, int nthreads) {
    int64_t max_len = 1;
    for (int64_t m = 0; m < M; m++) max_len = lens[m] > max_len ? lens[m] : max_len;
    const int64_t G = Hq / Hkv, nchunks = decode_chunks(max_len);
    float *abuf = malloc(sizeof(float) * (size_t)(nthreads * decode_scratch_floats(G, D)));
    float *parts = malloc(sizeof(float) * (size_t)(M * Hkv * nchunks * G * (2 + D)));
#pragma omp parallel num_threads(nthreads)
    decode_attention(M, q, Hq * D, Hq, Hkv, D, kc, vc, Hkv * D, tables, max_blocks, bs, lens, window, scale, sinks,
                     nchunks, abuf, parts, out, Hq * D, TID);
    free(abuf);
    free(parts);
}

// MLA decode in the absorbed form over the paged latent cache (DeepSeek-V2/V3): for decode row b and query head h
//   q_lat = W_UK^T[h] q_nope[b, h]                          (w_uk_t [H, C, N])
//   s_t   = (q_lat . c_kv[t] + q_pe[b, h] . k_pe[t]) * scale  over the row's cached latents t < lens[b]
//   p     = softmax(s) in float32,  ctx = sum_t p_t c_kv[t],  out[b, h] = W_UV[h] ctx   (w_uv [H, V, C])
// The cache is bf16 [blocks, bs, C + R] ([c_kv | k_pe] per token), read through the row's block table. A task is one
// (row, group of heads): a group reads each cached latent once for all its heads; with fewer rows than threads a
// row's heads split into enough groups for every thread (dynamic schedule), so both cores work at batch 1.
// W_UK^T and W_UV are bf16, or (w_q8) GGUF Q8_0 blocks read where they lie in the file: 32 values a block, an f16
// scale then 32 int8 codes (34 bytes), along N for w_uk_t and along C for w_uv (the file's attn_k_b / attn_v_b).
// Everything accumulates in float32.
#define MLA_MAX_GROUP 16  // heads per task at most
#define Q8_BLOCK_BYTES 34

static inline float dot_bf16_f32(const uint16_t *w, const float *x, int64_t d) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= d; i += 32) {
        a0 = _mm512_fmadd_ps(load_bf16x16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load_bf16x16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i + 16 <= d; i += 16) a0 = _mm512_fmadd_ps(load_bf16x16(w + i), _mm512_loadu_ps(x + i), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(load_bf16x8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_bf16x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; i < d; i++) s += bf16_to_float(w[i]) * x[i];
    return s;
}

// A row of d values (d % 32 == 0) as Q8_0 blocks, dotted with x: per block its f16 scale times sum(code * x).
static inline float dot_q8_f32(const uint8_t *w, const float *x, int64_t d) {
    float s = 0.0f;
    for (int64_t b = 0; b < d / 32; b++, w += Q8_BLOCK_BYTES, x += 32) {
        uint16_t h;
        memcpy(&h, w, 2);
        const int8_t *q = (const int8_t *)(w + 2);
#if defined(__AVX512F__)
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
        const float sb = _mm512_reduce_add_ps(_mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(x))));
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)))),
                                  _mm256_loadu_ps(x + i), acc);
        const float sb = hsum8(acc);
#else
        float sb = 0.0f;
        for (int i = 0; i < 32; i++) sb += (float)q[i] * x[i];
#endif
        s += half_to_float(h) * sb;
    }
    return s;
}

// Row j of a [rows, d] weight (bf16, or Q8_0 blocks when q8) dotted with x.
static inline float dot_row_f32(const void *w, int q8, int64_t j, const float *x, int64_t d) {
    if (q8) return dot_q8_f32((const uint8_t *)w + j * (d / 32) * Q8_BLOCK_BYTES, x, d);
    return dot_bf16_f32((const uint16_t *)w + j * d, x, d);
}

static inline void axpy_bf16(float a, const uint16_t *row, float *acc, int64_t d) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= d; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(av, load_bf16x16(row + i), _mm512_loadu_ps(acc + i)));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, load_bf16x8(row + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < d; i++) acc[i] += a * bf16_to_float(row[i]);
}

#if defined(__AVX512F__)
// mla_heads' two passes over the latents for G heads known at compile time, their sums in registers: scores (each
// latent row widened once per 16 dims for all G heads) and the context mix (per 16 context dims, G accumulators over
// all tokens). K and C multiples of 16.
static inline __attribute__((always_inline)) void mla_scores_g(const int G, int64_t K, const float *qf,
                                                               const uint16_t *cache, const int64_t *table, int64_t bs,
                                                               int64_t len, float *sc, float *mx) {
    for (int64_t b0 = 0; b0 < len; b0 += bs) {
        const uint16_t *blk = cache + table[b0 / bs] * bs * K;
        const int64_t e = len - b0 < bs ? len - b0 : bs;
        for (int64_t t = 0; t < e; t++) {
            __m512 acc[16];
            for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                const __m512 row = load_bf16x16(blk + t * K + k);
                for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * K + k), row, acc[g]);
            }
            for (int g = 0; g < G; g++) {
                const float v = _mm512_reduce_add_ps(acc[g]);
                sc[g * len + b0 + t] = v;
                mx[g] = v > mx[g] ? v : mx[g];
            }
        }
    }
}

static inline __attribute__((always_inline)) void mla_mix_g(const int G, int64_t C, int64_t K, const float *sc,
                                                            const uint16_t *cache, const int64_t *table, int64_t bs,
                                                            int64_t len, float *cx) {
    for (int64_t k = 0; k < C; k += 16) {
        __m512 acc[16];
        for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t b0 = 0; b0 < len; b0 += bs) {
            const uint16_t *blk = cache + table[b0 / bs] * bs * K + k;
            const int64_t e = len - b0 < bs ? len - b0 : bs;
            for (int64_t t = 0; t < e; t++) {
                const __m512 row = load_bf16x16(blk + t * K);
                for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * len + b0 + t]), row, acc[g]);
            }
        }
        for (int g = 0; g < G; g++) _mm512_storeu_ps(cx + g * C + k, acc[g]);
    }
}
#endif

// G heads of one row of mla_decode, sharing each latent's load: qf[g] (K = C + R floats each) holds head g's query
// in latent space, already scaled: [W_UK^T q_nope | q_pe] * scale; scratch sc (G x len floats) and cx (G x C floats);
// ov[g] (V floats each) gets head g's outputs. wv: W_UV of the first head (V x C each; bf16, or Q8_0 when wv_q8).
static void mla_heads(int64_t G, int64_t C, int64_t R, int64_t V, const float *qf, const void *wv, int wv_q8,
                      const uint16_t *cache, const int64_t *table, int64_t bs, int64_t len, float *sc, float *cx,
                      float *ov) {
    const int64_t K = C + R;
    float mx[MLA_MAX_GROUP], sum[MLA_MAX_GROUP];
    for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
#if defined(__AVX512F__)
    const int fast = K % 16 == 0 && C % 16 == 0 && (G == 16 || G == 8 || G == 4);
#else
    const int fast = 0;
#endif
    if (fast) {
#if defined(__AVX512F__)
        if (G == 16) mla_scores_g(16, K, qf, cache, table, bs, len, sc, mx);
        else if (G == 8) mla_scores_g(8, K, qf, cache, table, bs, len, sc, mx);
        else mla_scores_g(4, K, qf, cache, table, bs, len, sc, mx);
#endif
    } else
    for (int64_t b0 = 0; b0 < len; b0 += bs) {
        const uint16_t *blk = cache + table[b0 / bs] * bs * K;
        const int64_t e = len - b0 < bs ? len - b0 : bs;
        for (int64_t t = 0; t < e; t++) {
            for (int64_t g = 0; g < G; g++) {
                const float s = dot_bf16_f32(blk + t * K, qf + g * K, K);
                sc[g * len + b0 + t] = s;
                mx[g] = s > mx[g] ? s : mx[g];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float *sg = sc + g * len, acc_s = 0.0f;
        int64_t t = 0;
#if defined(__AVX512F__)
        const __m512 m = _mm512_set1_ps(mx[g]);
        __m512 acc = _mm512_setzero_ps();
        for (; t + 16 <= len; t += 16) {
            const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), m));
            _mm512_storeu_ps(sg + t, p);
            acc = _mm512_add_ps(acc, p);
        }
        acc_s = _mm512_reduce_add_ps(acc);
#endif
        for (; t < len; t++) {
            sg[t] = expf(sg[t] - mx[g]);
            acc_s += sg[t];
        }
        sum[g] = acc_s;
    }
    if (fast) {
#if defined(__AVX512F__)
        if (G == 16) mla_mix_g(16, C, K, sc, cache, table, bs, len, cx);
        else if (G == 8) mla_mix_g(8, C, K, sc, cache, table, bs, len, cx);
        else mla_mix_g(4, C, K, sc, cache, table, bs, len, cx);
#endif
    } else {
    memset(cx, 0, sizeof(float) * (size_t)(G * C));
    for (int64_t b0 = 0; b0 < len; b0 += bs) {
        const uint16_t *blk = cache + table[b0 / bs] * bs * K;
        const int64_t e = len - b0 < bs ? len - b0 : bs;
        for (int64_t t = 0; t < e; t++)
            for (int64_t g = 0; g < G; g++) axpy_bf16(sc[g * len + b0 + t], blk + t * K, cx + g * C, C);
    }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / sum[g];
        for (int64_t j = 0; j < V; j++) ov[g * V + j] = dot_row_f32(wv, wv_q8, g * V + j, cx + g * C, C) * inv;
    }
}

// Decode row b reads query row r = rows ? rows[b] : b of q_nope [., H, N] and q_pe [., H, R] (bf16 when q_bf16, else
// float32; rows and heads at the given strides, dims contiguous) and writes out[r] [H, V] (bf16 when out_bf16, else
// float32; rows and heads at the given strides). w_uk_t and w_uv bf16, or Q8_0 blocks when w_q8. tables [B,
// max_blocks], lens [B]. Returns 0 (nothing written) when a context length is out of range of its block table, a row
// out of [0, T), or Q8_0 weights with N or C not a multiple of 32.
int mla_decode(int64_t B, int64_t T, int64_t H, int64_t C, int64_t R, int64_t N, int64_t V, const void *q_nope, int64_t qn_row,
               int64_t qn_head, const void *q_pe, int64_t qp_row, int64_t qp_head, int q_bf16, const int64_t *rows,
               const void *w_uk_t, const void *w_uv, int w_q8, const uint16_t *cache, const int64_t *tables,
               int64_t max_blocks, int64_t bs, const int64_t *lens, float scale, void *out, int64_t o_row,
               int64_t o_head, int out_bf16, int nthreads) {
    const int64_t K = C + R;
    if (w_q8 && (N % 32 || C % 32)) return 0;
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 0 || lens[b] > max_blocks * bs || (rows && (rows[b] < 0 || rows[b] >= T))) return 0;
        max_len = lens[b] > max_len ? lens[b] : max_len;
    }
    // heads in groups that share each latent's load; enough groups for every thread at small batches
    int64_t ngroups = B >= nthreads ? 1 : (nthreads + B - 1) / B;
    if (ngroups < (H + MLA_MAX_GROUP - 1) / MLA_MAX_GROUP) ngroups = (H + MLA_MAX_GROUP - 1) / MLA_MAX_GROUP;
    if (ngroups > H) ngroups = H;
    const int64_t HG = (H + ngroups - 1) / ngroups;
    const int64_t per = HG * (K + max_len + C + V) + N + 16;
    float *scratch = malloc(sizeof(float) * (size_t)(nthreads * per));
    if (!scratch) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *qf = scratch + TID * per, *sc = qf + HG * K, *cx = sc + HG * max_len, *ov = cx + HG * C, *qn = ov + HG * V;
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < B * ngroups; i++) {
            const int64_t b = i / ngroups, h0 = i % ngroups * HG, len = lens[b], r = rows ? rows[b] : b;
            const int64_t G = H - h0 < HG ? H - h0 : HG;
            if (G <= 0) continue;
            for (int64_t g = 0; g < G; g++) {  // head h0 + g's query: W_UK^T q_nope and q_pe, scaled
                const int64_t h = h0 + g;
                float *q = qf + g * K;
                if (q_bf16) {
                    const uint16_t *qb = (const uint16_t *)q_nope + r * qn_row + h * qn_head;
                    const uint16_t *pb = (const uint16_t *)q_pe + r * qp_row + h * qp_head;
                    for (int64_t n = 0; n < N; n++) qn[n] = bf16_to_float(qb[n]);
                    for (int64_t k = 0; k < R; k++) q[C + k] = bf16_to_float(pb[k]) * scale;
                } else {
                    const float *qb = (const float *)q_nope + r * qn_row + h * qn_head;
                    const float *pb = (const float *)q_pe + r * qp_row + h * qp_head;
                    for (int64_t n = 0; n < N; n++) qn[n] = qb[n];
                    for (int64_t k = 0; k < R; k++) q[C + k] = pb[k] * scale;
                }
                for (int64_t j = 0; j < C; j++) q[j] = dot_row_f32(w_uk_t, w_q8, h * C + j, qn, N) * scale;
            }
            if (len == 0) memset(ov, 0, sizeof(float) * (size_t)(G * V));
            else {
                const void *wv = w_q8 ? (const void *)((const uint8_t *)w_uv + h0 * V * (C / 32) * Q8_BLOCK_BYTES)
                                      : (const void *)((const uint16_t *)w_uv + h0 * V * C);
                mla_heads(G, C, R, V, qf, wv, w_q8, cache, tables + b * max_blocks, bs, len, sc, cx, ov);
            }
            for (int64_t g = 0; g < G; g++) {
                const float *og = ov + g * V;
                if (out_bf16) {
                    uint16_t *o = (uint16_t *)out + r * o_row + (h0 + g) * o_head;
                    for (int64_t j = 0; j < V; j++) o[j] = float_to_bf16(og[j]);
                } else {
                    memcpy((float *)out + r * o_row + (h0 + g) * o_head, og, sizeof(float) * (size_t)V);
                }
            }
        }
    }
    free(scratch);
    return 1;
}
