// MXFP4 (HF gpt-oss layout) CPU kernels, called through ctypes from hearth/kernels/mxfp4_cpu.py.
//
// Weight rows hold G groups of 32 values: 16 bytes (byte k: value 2k in the low nibble, 2k+1 in the high one) and one
// e8m0 scale. Values are e2m1 codes, read here doubled as int8 (0,1,2,3,4,6,8,12, negated for codes 8..15) and scaled by
// 2^(s-128), which equals e2m1 * 2^(s-127) exactly (ggml does the same).
//
// mxfp4_gemv: out[m, n] = sum_g d(n, g) * sum_j w[n, g, j] * x[m, 32g + j] for a few rows of x (decode batches). x is
// passed pre-permuted per group as [even values 0,2,..,30 | odd values 1,3,..,31] so the low and high nibbles of the
// 16 bytes meet contiguous x. mxfp4_dequant: rows → float32, for larger batches (then a BLAS matmul).
//
// mxfp4_moe_q8 (bf16 serving): int8 activations, as gguf_cpu.c's r16_gemm and llama.cpp's q8_0 (per 32 values xd =
// amax/127, xq = round(x/xd)), against weights repacked at load ("R16", same bits): rows in groups of 16; per group
// and block of 32 values 4 chunks of 64 bytes (16 lanes, one per row, of 4 bytes; byte j of lane r holds value 8c+j of
// row r in its low nibble, 8c+4+j in its high one), and the 16 rows' e8m0 scales. vpshufb maps nibbles to the doubled
// e2m1 values + 12 (0..24, unsigned for vpdpbusd); the block's int dot is then sum - 12*sum(xq), exact in int32, and
// scaled by 2^(s-128) * xd in float32. Several experts' row segments run in one call (one OpenMP region).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "kernel_common.h"

static const int8_t LUT2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float e8m0_half(uint8_t s) {
    uint32_t bits = s < 2 ? (0x00200000u << s) : ((uint32_t)(s - 1) << 23);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define MAX_M 16

void mxfp4_gemv(int64_t M, int64_t N, int64_t G, const float *xp, const uint8_t *blocks, const uint8_t *scales,
                float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *brow = blocks + n * G * 16;
        const uint8_t *srow = scales + n * G;
#ifdef __AVX2__
        const __m128i lut = _mm_loadu_si128((const __m128i *)LUT2);
        const __m128i m4 = _mm_set1_epi8(0x0F);
        __m256 acc[MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            __m128i q = _mm_loadu_si128((const __m128i *)(brow + g * 16));
            __m128i wl = _mm_shuffle_epi8(lut, _mm_and_si128(q, m4));
            __m128i wh = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
            __m256 d = _mm256_set1_ps(e8m0_half(srow[g]));
            __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wl));
            __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(wl, 8)));
            __m256 c2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wh));
            __m256 c3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(wh, 8)));
            for (int64_t m = 0; m < M; m++) {
                const float *xg = xp + (m * G + g) * 32;
                __m256 p0 = _mm256_mul_ps(c0, _mm256_loadu_ps(xg));
                __m256 p1 = _mm256_mul_ps(c1, _mm256_loadu_ps(xg + 8));
                p0 = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xg + 16), p0);
                p1 = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xg + 24), p1);
                acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), d, acc[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            out[m * N + n] = _mm_cvtss_f32(s);
        }
#else
        float acc[MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float w[32];
            float d = e8m0_half(srow[g]);
            for (int k = 0; k < 16; k++) {
                uint8_t b = brow[g * 16 + k];
                w[k] = d * LUT2[b & 0x0F];
                w[16 + k] = d * LUT2[b >> 4];
            }
            for (int64_t m = 0; m < M; m++) {
                const float *xg = xp + (m * G + g) * 32;
                float s = 0.0f;
                for (int j = 0; j < 32; j++) s += w[j] * xg[j];
                acc[m] += s;
            }
        }
        for (int64_t m = 0; m < M; m++) out[m * N + n] = acc[m];
#endif
    }
}

void mxfp4_dequant(int64_t N, int64_t G, const uint8_t *blocks, const uint8_t *scales, float *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = blocks + (n * G + g) * 16;
            float d = e8m0_half(scales[n * G + g]);
            float *o = out + (n * G + g) * 32;
            for (int k = 0; k < 16; k++) {
                o[2 * k] = d * LUT2[b[k] & 0x0F];
                o[2 * k + 1] = d * LUT2[b[k] >> 4];
            }
        }
    }
}

// ---- int8 activations against R16-repacked weights ----

#define QK 32
#define R16_BYTES 256  // nibble bytes per 16 rows x 32 values

// Quantized activations: q [M, K] int8, per block of 32: d = amax/127 and the sum of the q
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
    int64_t K;
} QX;

static inline void quantize_block(const float *xb, int8_t *q, float *d, int32_t *s) { *s = q8_block(xb, q, d); }

#if defined(__AVX2__)
static const int8_t LUT2U[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};  // LUT2 + 12, unsigned
#endif

// the doubled e2m1 value (LUT2) of row r, value k of a 16-row block of repacked nibbles
static inline int r16_code(const uint8_t *qb, int r, int k) {
    const uint8_t byte = qb[(k / 8) * 64 + r * 4 + k % 4];
    return LUT2[(k % 8) < 4 ? byte & 15 : byte >> 4];
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 2^(s-128) for 16 e8m0 scales (e8m0_half, vectorised)
static inline __m512 e8m0_half16(const uint8_t *s) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(v, _mm512_set1_epi32(1)), 23);
    const __m512i tiny = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), v);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(v, _mm512_set1_epi32(2)), normal, tiny));
}

// one group of 16 rows (nb blocks: qg [nb][256] nibbles, sg [nb][16] scales) against T rows of x from m0:
// out[m0 + i, lane] = sum_b (int dot) * 2^(s-128) * xd
static inline __attribute__((always_inline)) void tile(const int T, const uint8_t *qg, const uint8_t *sg, int64_t nb,
                                                       const QX *x, int64_t m0, float *out, int64_t ldo, int64_t rows) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)LUT2U));
    __m512 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = qg + b * R16_BYTES;
        for (int c = 0; c < R16_BYTES; c += 64) _mm_prefetch((const char *)(qb + 4 * R16_BYTES + c), _MM_HINT_T0);
        __m512i wv[8];
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512((const void *)(qb + 64 * c));
            wv[2 * c] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m4));
            wv[2 * c + 1] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        }
        const __m512 d16 = e8m0_half16(sg + b * 16);
        for (int i = 0; i < T; i++) {
            const int64_t xi = (m0 + i) * nb + b;
            const int8_t *xb = x->q + xi * QK;
            __m512i iacc = _mm512_set1_epi32(-12 * x->s[xi]);
            for (int c = 0; c < 8; c++) iacc = _mm512_dpbusd_epi32(iacc, wv[c], _mm512_set1_epi32(load_i32(xb + 4 * c)));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), _mm512_mul_ps(d16, _mm512_set1_ps(x->d[xi])), acc[i]);
        }
    }
    const __mmask16 mask = rows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
    for (int i = 0; i < T; i++) _mm512_mask_storeu_ps(out + (m0 + i) * ldo, mask, acc[i]);
}

static void tile_rows(const uint8_t *qg, const uint8_t *sg, int64_t nb, const QX *x, int64_t m0, int64_t m1,
                      float *out, int64_t ldo, int64_t rows) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) tile(4, qg, sg, nb, x, m, out, ldo, rows);
    for (; m + 2 <= m1; m += 2) tile(2, qg, sg, nb, x, m, out, ldo, rows);
    if (m < m1) tile(1, qg, sg, nb, x, m, out, ldo, rows);
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 without VNNI: rows 8h..8h+7 of a group of 16 (the 32-byte half h of each 64-byte chunk) against T rows of x
// from m0. vpshufb maps the nibbles to the doubled e2m1 values + 12 (0..24, unsigned), vpmaddubsw multiplies them by
// 4 broadcast activation bytes and adds pairs (at most 2 * 24 * 127: no saturation), vpmaddwd sums the pairs to
// dwords; the block's int dot (sum - 12 * sum(xq)) and its float step are the AVX-512 tile's: the same results.
static inline __attribute__((always_inline)) void half_tile(const int T, const uint8_t *qg, const uint8_t *sg, int64_t nb,
                                                            int h, const QX *x, int64_t m0, float *out, int64_t ldo,
                                                            int64_t rows) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)LUT2U));
    __m256 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = qg + b * R16_BYTES + 32 * h;
        for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(qb + 4 * R16_BYTES + 64 * c), _MM_HINT_T0);
        __m256i wv[8];
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 64 * c));
            wv[2 * c] = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m4));
            wv[2 * c + 1] = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        }
        const uint8_t *sb = sg + b * 16 + 8 * h;  // 2^(s-128) for the 8 rows' e8m0 scales (e8m0_half, vectorised)
        const __m256i sv = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sb));
        const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(sv, _mm256_set1_epi32(1)), 23);
        const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), sv);
        const __m256 d8 = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), sv)));
        for (int i = 0; i < T; i++) {
            const int64_t xi = (m0 + i) * nb + b;
            const int8_t *xb = x->q + xi * QK;
            __m256i iacc = _mm256_set1_epi32(-12 * x->s[xi]);
            for (int c = 0; c < 8; c++)
                iacc = _mm256_add_epi32(iacc, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(load_i32(xb + 4 * c))), ones));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_mul_ps(d8, _mm256_set1_ps(x->d[xi])), acc[i]);
        }
    }
    for (int i = 0; i < T; i++) {
        float *o = out + (m0 + i) * ldo + 8 * h;
        if (rows >= 8) {
            _mm256_storeu_ps(o, acc[i]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[i]);
            for (int64_t r = 0; r < rows; r++) o[r] = tmp[r];
        }
    }
}

static void tile_rows(const uint8_t *qg, const uint8_t *sg, int64_t nb, const QX *x, int64_t m0, int64_t m1,
                      float *out, int64_t ldo, int64_t rows) {
    for (int h = 0; h < 2 && 8 * h < rows; h++) {
        const int64_t hr = rows - 8 * h;
        int64_t m = m0;
        for (; m + 4 <= m1; m += 4) half_tile(4, qg, sg, nb, h, x, m, out, ldo, hr);
        for (; m + 2 <= m1; m += 2) half_tile(2, qg, sg, nb, h, x, m, out, ldo, hr);
        if (m < m1) half_tile(1, qg, sg, nb, h, x, m, out, ldo, hr);
    }
}
#else
static void tile_rows(const uint8_t *qg, const uint8_t *sg, int64_t nb, const QX *x, int64_t m0, int64_t m1,
                      float *out, int64_t ldo, int64_t rows) {
    for (int r = 0; r < rows; r++)
        for (int64_t m = m0; m < m1; m++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int64_t xi = m * nb + b;
                int dot = 0;
                for (int k = 0; k < QK; k++) dot += r16_code(qg + b * R16_BYTES, r, k) * x->q[xi * QK + k];
                acc = fmaf((float)dot, e8m0_half(sg[b * 16 + r]) * x->d[xi], acc);
            }
            out[m * ldo + r] = acc;
        }
}
#endif

// out[t, n] = sum_k x[t, k] W_e[n, k] for the rows t of segment i (seg_start[i] <= t < seg_start[i+1]) with expert
// e = seg_expert[i]. x [T, K] float32; qs [E][groups][K/32][256], sc [E][groups][K/32][16] (groups = ceil(N/16)).
// Threads take contiguous runs of (segment, group) tiles, so each streams its own part of the weights.
void mxfp4_moe_q8(int64_t T, int64_t K, int64_t N, const float *x, int64_t S, const int64_t *seg_expert,
                  const int64_t *seg_start, const uint8_t *qs, const uint8_t *sc, float *out, int nthreads) {
    const int64_t nb = K / QK, groups = (N + 15) / 16;
    QX qx = {malloc((size_t)(T * K)), malloc(sizeof(float) * (size_t)(T * nb)), malloc(sizeof(int32_t) * (size_t)(T * nb)), K};
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * nb; i++) quantize_block(x + i * QK, qx.q + i * QK, qx.d + i, qx.s + i);
        const int64_t tiles = S * groups, nth = NTH, per = (tiles + nth - 1) / nth;
        const int64_t t0 = TID * per < tiles ? TID * per : tiles, t1 = t0 + per < tiles ? t0 + per : tiles;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t i = t / groups, g = t % groups, e = seg_expert[i];
            const int64_t rows = N - 16 * g < 16 ? N - 16 * g : 16;
            tile_rows(qs + ((e * groups + g) * nb) * R16_BYTES, sc + ((e * groups + g) * nb) * 16, nb, &qx,
                      seg_start[i], seg_start[i + 1], out + 16 * g, N, rows);
        }
    }
    free(qx.q);
    free(qx.d);
    free(qx.s);
}

// ---- a step's experts in one call (gpt-oss) ----
//
// mxfp4_moe: out[t] = sum over t's slots, in ascending expert order, of wts[t, s] * (down_e(act(gate_up_e x_t + gb_e))
// + db_e), e = ids[t, s]; act: gpt-oss's clamped SwiGLU of [gate, up] pairs (even, odd rows of gate_up): g = min(h,
// limit), u = clamp(h', -limit, limit), (u + 1) * g * sigmoid(alpha * g). The float32 steps and their order are those
// of the torch path it replaces (moe_q8, bias adds, the activation, the weighted index_add_ in expert order), in one
// OpenMP region instead of ~35 torch ops a layer. The (token, slot) pairs are sorted by expert so that an expert hit by
// several tokens reads its weights once: (0) x quantized per token and copied to the sorted rows; (1) gate/up tiles of
// each hit expert's row groups, taken by the threads as they come; (2) the activation, quantized; (3) down tiles; (4)
// each token's weighted sum. x and out float32 or bf16 (out rounded once). Returns -1 (nothing done) for an id
// outside [0, E), -2 for more than MOE_MAX_SLOTS slots.
#define MOE_GROUPS 16    // row groups per chunk of a projection's tiles
#define MOE_MAX_SLOTS 64  // experts per token (more: -2, the caller keeps its own path)

// One projection [E][N][K] of the hit experts against their sorted rows of x (runs of rows per expert: uexp, ustart),
// into out [rows][N]: chunks of MOE_GROUPS row groups of each run, taken by the enclosing region's threads as they
// come (so each streams a contiguous part of an expert's weights).
static void moe_projection(const uint8_t *qs, const uint8_t *sc, int64_t N, const QX *x, int64_t U, const int64_t *uexp,
                           const int64_t *ustart, float *out) {
    const int64_t K = x->K, nb = K / QK, groups = (N + 15) / 16, chunks = (groups + MOE_GROUPS - 1) / MOE_GROUPS;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < U * chunks; c++) {
        const int64_t u = c / chunks, e = uexp[u], r0 = ustart[u], g0 = (c % chunks) * MOE_GROUPS;
        const QX xu = {x->q + r0 * K, x->d + r0 * nb, x->s + r0 * nb, K};
        for (int64_t g = g0; g < g0 + MOE_GROUPS && g < groups; g++)
            tile_rows(qs + (e * groups + g) * nb * R16_BYTES, sc + (e * groups + g) * nb * 16, nb, &xu, 0,
                      ustart[u + 1] - r0, out + r0 * N + 16 * g, N, N - 16 * g < 16 ? N - 16 * g : 16);
    }
}

static inline float value_at(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

int mxfp4_moe(int64_t T, int64_t S, int64_t E, int64_t H, int64_t I2, const int64_t *ids, const float *wts,
              const void *x, int x_bf16, const uint8_t *gqs, const uint8_t *gsc, const void *gbias, const uint8_t *dqs,
              const uint8_t *dsc, const void *dbias, int bias_bf16, float alpha, float limit, void *out, int out_bf16,
              int nthreads) {
    const int64_t P = T * S, I = I2 / 2, nbh = H / QK, nbi = I / QK;
    if (S > MOE_MAX_SLOTS) return -2;
    for (int64_t i = 0; i < P; i++)
        if (ids[i] < 0 || ids[i] >= E) return -1;
    // the pairs sorted by expert: sorted row r holds pair perm[r]; run u is rows [ustart[u], ustart[u+1])
    int64_t *perm = malloc(sizeof(int64_t) * (size_t)P), *rank = malloc(sizeof(int64_t) * (size_t)P);
    int64_t *uexp = malloc(sizeof(int64_t) * (size_t)(E + 1)), *ustart = malloc(sizeof(int64_t) * (size_t)(E + 1));
    const int64_t U = moe_sort_pairs(P, E, ids, perm, rank, uexp, ustart);
    QX qt = {malloc((size_t)(T * H)), malloc(sizeof(float) * (size_t)(T * nbh)), malloc(sizeof(int32_t) * (size_t)(T * nbh)), H};
    QX qx = {malloc((size_t)(P * H)), malloc(sizeof(float) * (size_t)(P * nbh)), malloc(sizeof(int32_t) * (size_t)(P * nbh)), H};
    QX qh = {malloc((size_t)(P * I)), malloc(sizeof(float) * (size_t)(P * nbi)), malloc(sizeof(int32_t) * (size_t)(P * nbi)), I};
    float *hbuf = malloc(sizeof(float) * (size_t)(P * I2)), *ys = malloc(sizeof(float) * (size_t)(P * H));
#pragma omp parallel num_threads(nthreads)
    {
        // (0) each token quantized once, then copied to its pairs' sorted rows
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * nbh; i++) {
            float xb[QK];
            for (int k = 0; k < QK; k++) xb[k] = value_at(x, x_bf16, i * QK + k);
            quantize_block(xb, qt.q + i * QK, qt.d + i, qt.s + i);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            const int64_t t = perm[r] / S;
            memcpy(qx.q + r * H, qt.q + t * H, (size_t)H);
            memcpy(qx.d + r * nbh, qt.d + t * nbh, sizeof(float) * (size_t)nbh);
            memcpy(qx.s + r * nbh, qt.s + t * nbh, sizeof(int32_t) * (size_t)nbh);
        }
        moe_projection(gqs, gsc, I2, &qx, U, uexp, ustart, hbuf);  // (1) gate/up
        // (2) bias, activation, quantized per 32 values
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            const float *h = hbuf + r * I2;
            const int64_t gb = ids[perm[r]] * I2;
            for (int64_t b = 0; b < nbi; b++) {
                float a[QK], gs[QK];
                for (int k = 0; k < QK; k++) {
                    const int64_t j = b * QK + k;
                    float g = h[2 * j] + value_at(gbias, bias_bf16, gb + 2 * j);
                    float up = h[2 * j + 1] + value_at(gbias, bias_bf16, gb + 2 * j + 1);
                    gs[k] = g > limit ? limit : g;
                    a[k] = (up > limit ? limit : up < -limit ? -limit : up) + 1.0f;
                }
#if defined(__AVX512F__)
                // sigmoid with the AVX-512 exp (relative error < 2e-7; torch's differs from expf by an ulp as well)
                for (int k = 0; k < QK; k += 16) {
                    const __m512 g = _mm512_loadu_ps(gs + k), one = _mm512_set1_ps(1.0f);
                    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(g, _mm512_set1_ps(alpha))));
                    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
                    _mm512_storeu_ps(a + k, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_mul_ps(g, sig)));
                }
#else
                for (int k = 0; k < QK; k++) a[k] *= gs[k] * (1.0f / (1.0f + expf(-(gs[k] * alpha))));
#endif
                quantize_block(a, qh.q + r * I + b * QK, qh.d + r * nbi + b, qh.s + r * nbi + b);
            }
        }
        moe_projection(dqs, dsc, H, &qh, U, uexp, ustart, ys);  // (3) down
        // (4) per token, its pairs in expert order (as index_add_ over the sorted pairs): (y + bias) * w, summed
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t order[MOE_MAX_SLOTS];
            const int64_t n = S;
            for (int64_t s2 = 0; s2 < n; s2++) {  // slots by sorted row (= by expert, stable)
                int64_t j = s2;
                const int64_t p = t * S + s2;
                while (j > 0 && rank[order[j - 1]] > rank[p]) order[j] = order[j - 1], j--;
                order[j] = p;
            }
            for (int64_t c0 = 0; c0 < H; c0 += 256) {
                const int64_t c1 = c0 + 256 < H ? c0 + 256 : H;
                float o[256];
                for (int64_t c = 0; c < c1 - c0; c++) o[c] = 0.0f;
                for (int64_t k = 0; k < n; k++) {
                    const int64_t p = order[k];
                    const float w = wts[p], *y = ys + rank[p] * H + c0;
                    const int64_t db = ids[p] * H + c0;
                    for (int64_t c = 0; c < c1 - c0; c++) {
                        const float yb = y[c] + value_at(dbias, bias_bf16, db + c), prod = yb * w;
                        o[c] = o[c] + prod;
                    }
                }
                for (int64_t c = 0; c < c1 - c0; c++) {
                    if (out_bf16)
                        ((uint16_t *)out)[t * H + c0 + c] = float_to_bf16(o[c]);
                    else
                        ((float *)out)[t * H + c0 + c] = o[c];
                }
            }
        }
    }
    free(qt.q), free(qt.d), free(qt.s), free(qx.q), free(qx.d), free(qx.s), free(qh.q), free(qh.d), free(qh.s);
    free(hbuf), free(ys), free(perm), free(rank), free(uexp), free(ustart);
    return 0;
}

// ---- load-time repack: HF layout -> R16 ----

// One chunk's 4 bytes b0..b3 (values 8c..8c+7, two per byte; little-endian word w) -> its 4 lane bytes j = 0..3 (value
// 8c+j low, 8c+4+j high): lo(b0)|lo(b2)<<4, hi(b0)|hi(b2)<<4, lo(b1)|lo(b3)<<4, hi(b1)|hi(b3)<<4.
static inline uint32_t r16_chunk(uint32_t w) {
    uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
    lo = (lo | lo >> 12) & 0xFFFFu;  // [lo(b0)|lo(b2)<<4, lo(b1)|lo(b3)<<4]
    hi = (hi | hi >> 12) & 0xFFFFu;
    return (lo & 0xFFu) | (hi & 0xFFu) << 8 | (lo & 0xFF00u) << 8 | (hi & 0xFF00u) << 16;
}

// Load-time repack, HF layout -> R16: blocks [E][N][G][16], scales [E][N][G] -> qs [E][groups][G][256], sc
// [E][groups][G][16] (groups = ceil(N/16); rows past N are zero). Memory-bound; threads take (expert, group) tiles,
// and a tile's output (G * 272 bytes) stays in cache while its 16 rows are read in turn.
void mxfp4_repack_r16(int64_t E, int64_t N, int64_t G, const uint8_t *blocks, const uint8_t *scales, uint8_t *qs,
                      uint8_t *sc, int nthreads) {
    const int64_t groups = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < E * groups; t++) {
        const int64_t e = t / groups, r0 = 16 * (t % groups);
        const int rows = N - r0 < 16 ? (int)(N - r0) : 16;
        uint8_t *qt = qs + t * G * R16_BYTES, *st = sc + t * G * 16;
        if (rows < 16) {
            memset(qt, 0, (size_t)(G * R16_BYTES));
            memset(st, 0, (size_t)(G * 16));
        }
        for (int r = 0; r < rows; r++) {
            const uint8_t *brow = blocks + (e * N + r0 + r) * G * 16, *srow = scales + (e * N + r0 + r) * G;
            for (int64_t g = 0; g < G; g++) {
                for (int c = 0; c < 4; c++) {
                    uint32_t w;
                    memcpy(&w, brow + g * 16 + 4 * c, 4);
                    w = r16_chunk(w);
                    memcpy(qt + g * R16_BYTES + 64 * c + 4 * r, &w, 4);
                }
                st[g * 16 + r] = srow[g];
            }
        }
    }
}

// Load-time repack straight from GGUF's MXFP4 blocks (17 bytes: e8m0 scale, then 16 bytes of codes) -> R16, without
// the HF layout in between. P sources (srcs[p]: [E][N/P][G][17]) are interleaved by row: output row r of expert e is
// row r/P of source r%P (P = 2: GGUF's separate gate and up -> gate_up's alternating rows). Output as
// mxfp4_repack_r16's; threads take (expert, group) tiles.
void mxfp4_gguf_repack_r16(int64_t E, int64_t N, int64_t G, int64_t P, const int64_t *srcs, uint8_t *qs, uint8_t *sc,
                           int nthreads) {
    const int64_t groups = (N + 15) / 16, rows_per_src = N / P;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < E * groups; t++) {
        const int64_t e = t / groups, r0 = 16 * (t % groups);
        const int rows = N - r0 < 16 ? (int)(N - r0) : 16;
        uint8_t *qt = qs + t * G * R16_BYTES, *st = sc + t * G * 16;
        if (rows < 16) {
            memset(qt, 0, (size_t)(G * R16_BYTES));
            memset(st, 0, (size_t)(G * 16));
        }
        for (int r = 0; r < rows; r++) {
            const int64_t row = r0 + r;
            const uint8_t *src = (const uint8_t *)(intptr_t)srcs[row % P] + (e * rows_per_src + row / P) * G * 17;
            for (int64_t g = 0; g < G; g++) {
                uint32_t chunks[4];
                q4_r16_chunks(src + g * 17 + 1, chunks);
                for (int c = 0; c < 4; c++) memcpy(qt + g * R16_BYTES + 64 * c + 4 * r, &chunks[c], 4);
                st[g * 16 + r] = src[g * 17];
            }
        }
    }
}

// GGUF MXFP4 blocks -> the HF layout, for float32 runs: rows x G blocks of 17 bytes (scale, then byte j: value j low,
// j+16 high) -> blocks [rows][G][16] (byte k: value 2k low, 2k+1 high) and scales [rows][G]. One pass, threads by row.
void mxfp4_gguf_to_hf(int64_t R, int64_t G, const uint8_t *src, uint8_t *blocks, uint8_t *scales, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = src + (r * G + g) * 17, *q = b + 1;
            uint8_t *out = blocks + (r * G + g) * 16;
            scales[r * G + g] = b[0];
            for (int k = 0; k < 8; k++) out[k] = (uint8_t)((q[2 * k] & 15) | (q[2 * k + 1] & 15) << 4);
            for (int k = 8; k < 16; k++) out[k] = (uint8_t)(q[2 * k - 16] >> 4 | (q[2 * k - 15] & 0xF0));
        }
    }
}
