// Decode attention over Hearth's paged bf16 KV cache: one new query token per sequence, flash-decoding style. Used by
// the fused decode step (llama_decode.c) and, for the decode rows of mixed prefill/decode steps, by attention_cpu.c.
// cbuild.load_library hashes this header into each library's cache key.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel_common.h"

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
#elif defined(__AVX2__) && defined(__FMA__)
    if (d % 8 == 0) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        for (int64_t i = 8; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        return hsum8(acc);
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
#elif defined(__AVX2__)
    if (d % 8 == 0) {
        for (int64_t i = 0; i < d; i += 8)
            _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
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

// out[d] of one query head from its nc chunk partials (each `pstride` floats apart); `sink` is a logit with no value
// that joins the softmax denominator (-INFINITY: none)
static void merge_heads(const float *part, int64_t nc, int64_t pstride, int64_t d, float sink, float *out) {
    float mx = sink;
    for (int64_t c = 0; c < nc; c++) mx = part[c * pstride] > mx ? part[c * pstride] : mx;
    float denom = sink == -INFINITY ? 0.0f : expf(sink - mx);
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t c = 0; c < nc; c++) {
        const float *pc = part + c * pstride, w = expf(pc[0] - mx);
        denom += pc[1] * w;
        for (int64_t i = 0; i < d; i++) out[i] += w * pc[2 + i];
    }
    const float inv = 1.0f / denom;
    for (int64_t i = 0; i < d; i++) out[i] *= inv;
}

// Scratch floats per thread for decode_attention (abuf), and per sequence for its chunk partials (parts).
static inline int64_t decode_scratch_floats(int64_t G, int64_t D) { return G * ATT_CHUNK + D + G * D; }
static inline int64_t decode_chunks(int64_t max_len) { return (max_len + ATT_CHUNK - 1) / ATT_CHUNK; }

// M sequences' query heads q[m] (Hq x D floats, `qstride` apart) against their cached keys and values: kc/vc point
// at KV head 0 of slot 0, slots `kvstride` values apart, KV head g at + g*D; sequence m reads keys [start, len) of
// lens[m] through its block table tables + m * max_blocks (start = len - window with a window, else 0). out[m]:
// Hq x D floats `ostride` apart. sinks: Hq floats (a value-less logit per head in the denominator) or NULL.
// Call from inside an OpenMP parallel region (its loops are orphaned `omp for`s); abuf: decode_scratch_floats per
// thread, parts: M * Hkv * nchunks * G * (2 + D) floats (nchunks = decode_chunks of the longest context).
static void decode_attention(int64_t M, const float *q, int64_t qstride, int64_t Hq, int64_t Hkv, int64_t D,
                             const uint16_t *kc, const uint16_t *vc, int64_t kvstride, const int64_t *tables,
                             int64_t max_blocks, int64_t bs, const int64_t *lens, int64_t window, float scale,
                             const float *sinks, int64_t nchunks, float *abuf, float *parts, float *out,
                             int64_t ostride, int tid) {
    const int64_t G = Hq / Hkv, pstride = G * (2 + D);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < M * Hkv * nchunks; i++) {
        const int64_t m = i / (Hkv * nchunks), g = i / nchunks % Hkv, c = i % nchunks, len = lens[m];
        const int64_t start = window > 0 && len > window ? len - window : 0;
        const int64_t t0 = start + c * ATT_CHUNK, t1 = t0 + ATT_CHUNK < len ? t0 + ATT_CHUNK : len;
        if (t0 < t1)
            attend_chunk(q + m * qstride + g * G * D, G, kc + g * D, vc + g * D, tables + m * max_blocks, bs, t0, t1,
                         kvstride, D, scale, abuf + tid * decode_scratch_floats(G, D), parts + i * pstride);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * Hq; i++) {
        const int64_t m = i / Hq, hh = i % Hq, g = hh / G, len = lens[m];
        const int64_t start = window > 0 && len > window ? len - window : 0;
        const int64_t nc = (len - start + ATT_CHUNK - 1) / ATT_CHUNK;
        merge_heads(parts + (m * Hkv + g) * nchunks * pstride + (hh % G) * (2 + D), nc, pstride, D,
                    sinks ? sinks[hh] : -INFINITY, out + m * ostride + hh * D);
    }
}
