// The elementwise work between the matmuls of a bf16 prefill on CPU, one pass over memory each, called through ctypes
// from hearth/kernels/elementwise_cpu.py. Every kernel takes rows `stride` elements apart (contiguous within a row),
// computes in float32 and rounds to bf16 to nearest even; OpenMP over rows. AVX-512 (F, BW, VL; BF16 and DQ speed up
// the rounding) where built with it, else plain C (`-std=c11` keeps the compiler from fusing a * b + c unasked, so
// both take the same float32 steps).
//
// ew_rms_norm: with `residual`, s = bf16(x + residual) is written back into residual (torch's bf16 add: one float32
// add, one rounding) and normalised; without, s = x. out = bf16((s * r) * w), r = 1 / sqrt(sum(s^2) / H + eps), as
// F.rms_norm does for bf16 (normalise and scale in float32, round once); only the order of the sum of squares differs.
//
// ew_silu_and_mul: x = [gate | up] (2 * I per row) -> out = bf16(bf16(silu(gate)) * up), torch's bf16 steps; silu(g) =
// g / (1 + exp(-g)) as ATen writes it. The AVX-512 exp (exp512, relative error < 2e-7) differs from torch's (SLEEF,
// 1 ulp) by a few float32 ulps, so bf16(silu) can differ by one bf16 step where the float32 value lies within those
// ulps of a rounding midpoint: rare (none in 6M random gates); the product's rounding can carry that to two steps.
//
// ew_rotary: rotate-half rope in place on x [T, heads, D] (tokens `x_stride` apart, heads `h_stride`) with bf16 cos/sin
// rows [T, D] (one per token), in torch's bf16 steps (HF's rope on a bf16 model,
// addcmul(x * cos, rotate_half(x), sin)): for i < D/2
//   x[i] = bf16(bf16(x[i] * cos[i]) - x[i + D/2] * sin[i]),  x[i + D/2] = bf16(bf16(x[i + D/2] * cos[i + D/2]) + x[i] * sin[i + D/2]).
// Products of two bf16 values are exact in float32, so each step rounds once, as torch does: bit for bit.
//
// ew_grouped_topk: DeepSeek's MoE routing of float32 router logits, one row per token, in torch's float32 steps (the
// layers' grouped_topk): scores = sigmoid(l) or softmax(l); choice = scores + bias; with groups, only the experts of
// the `topk_group` best groups (a group scores the sum of its top-2 choices under sigmoid, its best under softmax)
// compete; the top_k choices in descending order (ties: the lower index); weights = their scores, divided by
// (their sum + 1e-20) if `norm`, times `scaling`. expf may differ from torch's exp by an ulp: weights agree to ~1e-7.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_common.h"

#define MIN_PARALLEL 16384  // elements below which one thread does the whole call (waking threads costs microseconds)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define EW_AVX512 1

static inline __mmask16 mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 k) { return bf16x16_widen(_mm256_maskz_loadu_epi16(k, p)); }

static inline __m512 round_bf16(__m512 v) { return bf16x16_widen(bf16x16_round(v)); }

static inline void store_bf16(uint16_t *p, __m512 v, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, bf16x16_round(v)); }
#endif

int ew_vectorized(void) {
#ifdef EW_AVX512
    return 1;
#else
    return 0;
#endif
}

static void rms_norm_row(int64_t H, const uint16_t *x, uint16_t *res, const uint16_t *w, float eps, uint16_t *out) {
    const uint16_t *s = res ? res : x;  // the row normalised: the sum, once written back
    float ss;
#ifdef EW_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 k = mask16(H - i);
        __m512 v = load_bf16(x + i, k);
        if (res) {
            v = round_bf16(_mm512_add_ps(v, load_bf16(res + i, k)));
            store_bf16(res + i, v, k);
        }
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#else
    ss = 0.0f;
    for (int64_t i = 0; i < H; i++) {
        float v = bf16_to_float(x[i]);
        if (res) {
            res[i] = float_to_bf16(v + bf16_to_float(res[i]));
            v = bf16_to_float(res[i]);
        }
        ss += v * v;
    }
#endif
    const float r = 1.0f / sqrtf(ss / (float)H + eps);
#ifdef EW_AVX512
    const __m512 rv = _mm512_set1_ps(r);
    for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 k = mask16(H - i);
        store_bf16(out + i, _mm512_mul_ps(_mm512_mul_ps(load_bf16(s + i, k), rv), load_bf16(w + i, k)), k);
    }
#else
    for (int64_t i = 0; i < H; i++) out[i] = float_to_bf16(bf16_to_float(s[i]) * r * bf16_to_float(w[i]));
#endif
}

// x [M, H] (rows x_stride apart), residual [M, H] or NULL (rows r_stride apart, updated in place), weight [H],
// out [M, H] (rows out_stride apart)
void ew_rms_norm(int64_t M, int64_t H, const uint16_t *x, int64_t x_stride, uint16_t *residual, int64_t r_stride,
                 const uint16_t *weight, float eps, uint16_t *out, int64_t out_stride, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * H >= MIN_PARALLEL)
    for (int64_t m = 0; m < M; m++)
        rms_norm_row(H, x + m * x_stride, residual ? residual + m * r_stride : NULL, weight, eps, out + m * out_stride);
}

// x [M, 2 * I] = [gate | up] (rows x_stride apart) -> out [M, I] (rows out_stride apart)
void ew_silu_and_mul(int64_t M, int64_t I, const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t out_stride,
                     int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * I >= MIN_PARALLEL)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *gate = x + m * x_stride, *up = gate + I;
        uint16_t *o = out + m * out_stride;
#ifdef EW_AVX512
        const __m512 one = _mm512_set1_ps(1.0f);
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 k = mask16(I - i);
            const __m512 g = load_bf16(gate + i, k);
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store_bf16(o + i, _mm512_mul_ps(round_bf16(silu), load_bf16(up + i, k)), k);
        }
#else
        for (int64_t i = 0; i < I; i++) {
            const float g = bf16_to_float(gate[i]);
            const float silu = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
            o[i] = float_to_bf16(silu * bf16_to_float(up[i]));
        }
#endif
    }
}

// x [T, heads, D] bf16 in place (tokens x_stride apart, heads h_stride >= D apart); cos/sin bf16 [T, D]
void ew_rotary(int64_t T, int64_t heads, int64_t D, uint16_t *x, int64_t x_stride, int64_t h_stride,
               const uint16_t *cos, const uint16_t *sin, int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * heads * D >= MIN_PARALLEL)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + t * x_stride + h * h_stride, *x2 = x1 + half;
#ifdef EW_AVX512
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 k = mask16(half - i);
                const __m512 a = load_bf16(x1 + i, k), b = load_bf16(x2 + i, k);
                const __m512 c1 = load_bf16(c + i, k), c2 = load_bf16(c + half + i, k);
                const __m512 s1 = load_bf16(s + i, k), s2 = load_bf16(s + half + i, k);
                store_bf16(x1 + i, _mm512_fnmadd_ps(b, s1, round_bf16(_mm512_mul_ps(a, c1))), k);
                store_bf16(x2 + i, _mm512_fmadd_ps(a, s2, round_bf16(_mm512_mul_ps(b, c2))), k);
            }
#else
            for (int64_t i = 0; i < half; i++) {
                const float a = bf16_to_float(x1[i]), b = bf16_to_float(x2[i]);
                const float c1 = bf16_to_float(c[i]), c2 = bf16_to_float(c[half + i]);
                const float s1 = bf16_to_float(s[i]), s2 = bf16_to_float(s[half + i]);
                x1[i] = float_to_bf16(bf16_to_float(float_to_bf16(a * c1)) - b * s1);
                x2[i] = float_to_bf16(bf16_to_float(float_to_bf16(b * c2)) + a * s2);
            }
#endif
        }
    }
}

#define ROUTE_MAX_EXPERTS 1024

// logits [T, E] float32 (rows l_stride apart), bias [E] float32; weights [T, K] float32 and ids [T, K] int64 out.
// Returns 0 (nothing written) for more than ROUTE_MAX_EXPERTS experts or groups that do not divide E.
int ew_grouped_topk(int64_t T, int64_t E, const float *logits, int64_t l_stride, const float *bias, int64_t K,
                    int64_t G, int64_t KG, int norm, float scaling, int softmax, float *weights, int64_t *ids,
                    int nthreads) {
    if (E > ROUTE_MAX_EXPERTS || G < 1 || E % G || K > E || KG > G) return 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * E >= MIN_PARALLEL)
    for (int64_t t = 0; t < T; t++) {
        float sc[ROUTE_MAX_EXPERTS], ch[ROUTE_MAX_EXPERTS], gs[ROUTE_MAX_EXPERTS];
        unsigned char keep[ROUTE_MAX_EXPERTS];
        const float *l = logits + t * l_stride;
        if (softmax) {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            for (int64_t e = 0; e < E; e++) sum += sc[e] = expf(l[e] - mx);
            for (int64_t e = 0; e < E; e++) sc[e] = sc[e] / sum;
        } else {
            for (int64_t e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + expf(-l[e]));
        }
        for (int64_t e = 0; e < E; e++) ch[e] = sc[e] + bias[e], keep[e] = 1;
        if (KG < G) {
            const int64_t per = E / G;
            for (int64_t g = 0; g < G; g++) {
                float a = -INFINITY, b = -INFINITY;  // the group's best two
                for (int64_t e = g * per; e < (g + 1) * per; e++) {
                    if (ch[e] > a) b = a, a = ch[e];
                    else if (ch[e] > b) b = ch[e];
                }
                gs[g] = softmax ? a : a + b;
            }
            unsigned char chosen[ROUTE_MAX_EXPERTS] = {0};
            for (int64_t k = 0; k < KG; k++) {
                int64_t best = -1;
                for (int64_t g = 0; g < G; g++)
                    if (!chosen[g] && (best < 0 || gs[g] > gs[best])) best = g;
                if (best < 0) break;
                chosen[best] = 1;
            }
            for (int64_t e = 0; e < E; e++) keep[e] = chosen[e / per];
        }
        float *w = weights + t * K, sum = 0.0f;
        int64_t *id = ids + t * K;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (keep[e] == 1 && (best < 0 || ch[e] > ch[best])) best = e;
            if (best < 0) {  // fewer kept experts than K (not for valid configs): the masked ones follow
                for (int64_t e = 0; e < E; e++)
                    if (keep[e] == 0 && (best < 0 || ch[e] > ch[best])) best = e;
            }
            if (best < 0) best = 0;  // K > E: refused above
            keep[best] = 2;  // taken
            id[k] = best;
            w[k] = sc[best];
            sum += w[k];
        }
        for (int64_t k = 0; k < K; k++) w[k] = (norm ? w[k] / (sum + 1e-20f) : w[k]) * scaling;
    }
    return 1;
}
