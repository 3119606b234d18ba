// Helpers shared by the kernel sources (cbuild.load_library hashes this header into each library's cache key).
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define TID omp_get_thread_num()
#define NTH omp_get_num_threads()
#else
#define TID 0
#define NTH 1
#endif

// bf16 <-> float32 (round to nearest even, as torch's .to(torch.bfloat16); branch-free; NaN stays NaN)
static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// 4 bytes of int8 activations as one dword (to broadcast against a 4-byte lane of weights)
static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX2__)
// 8 bf16 values -> float32 (exact), and the sum of a register's 8 floats
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// f16 -> float32 (exact): a GGUF block scale
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

#if defined(__AVX512F__)
#include <immintrin.h>
// 16 bf16 values -> float32 (exact), from a register or from memory
static inline __m512 bf16x16_widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

static inline __m512 load_bf16x16(const uint16_t *p) { return bf16x16_widen(_mm256_loadu_si256((const __m256i *)p)); }

// 16 floats -> bf16, as float_to_bf16 (to nearest even, NaN stays NaN). vcvtneps2bf16 does it in one instruction but
// flushes denormals to zero, so a vector holding one (vfpclassps) takes the integer path: torch's rounding everywhere.
static inline __m256i bf16x16_round(__m512 v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    if (!_mm512_fpclass_ps_mask(v, 0x20)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

// exp(x): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6 Taylor polynomial (relative error < 2e-7).
// Softmax weights (x <= 0): below -87 the result is ~1e-38, as good as 0 next to the row's largest weight, 1. SiLU
// also passes positive x: past ~88.7 the scaling overflows to +inf, as expf does.
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
#endif

// Activations to int8, per block of 32 values as llama.cpp's q8_0: d = amax/127, q = round(x / d) (to nearest even);
// writes q and d, returns the sum of q.
static inline int q8_block(const float *xb, int8_t *q, float *d) {
#if defined(__AVX512F__)
    // 16 lanes at a time (a scalar loop ran at ~1 value/ns: a third of a 512-row projection's time)
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(i1));
    *d = db;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#elif defined(__AVX2__)
    // the same steps 8 lanes at a time: round to nearest even (vcvtps2dq), narrow with saturation, sum before it
    __m256 v[4], amax8 = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i), amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float db = _mm_cvtss_f32(m4) / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    __m256i iv[4];
    for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    // packs interleave 128-bit lanes: dwords come out as values 0-3, 8-11, 16-19, 24-27, 4-7, 12-15, 20-23, 28-31
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    *d = db;
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        const int v = (int)nearbyintf(xb[j] * id);
        q[j] = (int8_t)v;
        sum += v;
    }
    *d = db;
    return sum;
#endif
}

// One GGUF Q4 block's 16 bytes of nibbles (byte j: value j low, j+16 high) -> the 4 words of the R16 lanes (chunk
// c, lane byte j: value 8c+j low, 8c+4+j high); the GGUF and MXFP4 repacks share it.
static inline void q4_r16_chunks(const uint8_t *q, uint32_t out[4]) {
    uint32_t w[4];
    memcpy(w, q, 16);
    const uint32_t lo = 0x0F0F0F0Fu, hi = 0xF0F0F0F0u;
    out[0] = (w[0] & lo) | (w[1] & lo) << 4;
    out[1] = (w[2] & lo) | (w[3] & lo) << 4;
    out[2] = (w[0] >> 4 & lo) | (w[1] & hi);
    out[3] = (w[2] >> 4 & lo) | (w[3] & hi);
}

// The P (token, slot) pairs of a MoE step (ids: each pair's expert, all in [0, E)) sorted by expert, stably: sorted row
// r holds pair perm[r] and rank[perm[r]] = r; the hit experts in order, uexp[u], each a run of sorted rows [ustart[u],
// ustart[u+1]). perm and rank hold P values, uexp and ustart E + 1. Returns the number of runs. (The GGUF and MXFP4
// MoE kernels both sort this way, so an expert hit by several tokens reads its weights once.)
static inline int64_t moe_sort_pairs(int64_t P, int64_t E, const int64_t *ids, int64_t *perm, int64_t *rank,
                                     int64_t *uexp, int64_t *ustart) {
    int64_t *cnt = calloc((size_t)E + 1, sizeof(int64_t)), U = 0;
    for (int64_t i = 0; i < P; i++) cnt[ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    for (int64_t e = 0; e < E; e++)
        if (cnt[e + 1] > cnt[e]) uexp[U] = e, ustart[U++] = cnt[e];
    ustart[U] = P;
    for (int64_t i = 0; i < P; i++) perm[cnt[ids[i]]++] = i;  // stable: pairs of one expert in pair order
    for (int64_t r = 0; r < P; r++) rank[perm[r]] = r;
    free(cnt);
    return U;
}
