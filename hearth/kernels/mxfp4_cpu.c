// MXFP4 (HF gpt-oss layout) CPU kernels, called through ctypes from hearth/kernels/mxfp4_cpu.py.
//
// Weight rows hold G groups of 32 values: 16 bytes (byte k: value 2k in the low nibble, 2k+1 in the high one) and one
// e8m0 scale. Values are e2m1 codes, read here doubled as int8 (0,1,2,3,4,6,8,12, negated for codes 8..15) and scaled by
// 2^(s-128), which equals e2m1 * 2^(s-127) exactly (ggml does the same).
//
// mxfp4_gemv: out[m, n] = sum_g d(n, g) * sum_j w[n, g, j] * x[m, 32g + j] for a few rows of x (decode batches). x is
// passed pre-permuted per group as [even values 0,2,..,30 | odd values 1,3,..,31] so the low and high nibbles of the
// 16 bytes meet contiguous x. mxfp4_dequant: rows → float32, for larger batches (then a BLAS matmul).
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

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
