/* Native CPU kernels on GGUF blocks as they are stored (no repack), for moeserve.
 *
 * Why: on AVX2-only CPUs torch's int4 kernel spends ~0.35 cycles per weight at m = 1 (it is
 * instruction-bound, not bandwidth-bound), and its bf16 activations/outputs cost ~4e-3 relative
 * error. These kernels read the file's bytes directly (zero load time, zero extra memory) and
 * use integer dot products with 16-bit activations:
 *
 *   x (float32) is quantized per 256 values to x16 = round(x / s), |x16| <= 32512, then split
 *   into two int8 planes x16 = 255 * hi + lo (both in -127..127), so that pmaddubsw
 *   (u8 weights x s8 activations) never saturates. Sum(q * x16) = 255 * Sum(q * hi) + Sum(q * lo)
 *   is exact in int32; the block scales are applied in float32. Relative activation error is
 *   ~2^-16 of the block maximum (llama.cpp uses 8 bits; bf16 has 8 significant bits).
 *
 * Offsets (Q4_0's -8, Q6_K's -32, Q4_1/Q4_K mins) are applied with exact integer sums of x16
 * per 16 values (`bsum`).
 *
 * For larger m, `mk_dequant` writes the exact float32 weights (same arithmetic order as the
 * reference dequantizer) and the caller uses a float32 GEMM.
 *
 * Threads: OpenMP over weight rows, only for matrices of >= PAR_MIN weights: a fork/join costs
 * microseconds (tens on a busy machine), more than a small matmul. The library links
 * libgomp.so.1, the same soname torch loads, so the process keeps one OpenMP pool.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q5_K = 13, QT_Q6_K = 14 };

#define QK 256
#define XMAX 32512.0f /* 255 * 127 + 127 */
#define PAR_MIN (1 << 18) /* weights (x rows) below which a matmul runs on the calling thread */

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---------------------------------------------------------------------------------------
 * activations
 * ------------------------------------------------------------------------------------- */

typedef struct {
    int8_t *hi, *lo; /* [K] each */
    float *s;        /* [K / 256] */
    int32_t *bsum;   /* [K / 16]: Sum(x16) per 16 values */
} xq_t;

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* four int32x8 (each in -127..127) -> 32 int8 in order */
static inline void store_i8x32(int8_t *dst, __m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    __m256i r = _mm256_packs_epi16(ab, cd);
    r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)dst, r);
}

static void quant_row(const float *x, int64_t K, xq_t q) {
    const __m256 sign = _mm256_set1_ps(-0.0f), v255 = _mm256_set1_ps(255.0f);
    const __m256i lim = _mm256_set1_epi32(32512), nlim = _mm256_set1_epi32(-32512), i255 = _mm256_set1_epi32(255);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 vmax = _mm256_setzero_ps();
        for (int i = 0; i < QK; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? XMAX / amax : 0.0f);
        q.s[b] = amax / XMAX;
        for (int g = 0; g < QK; g += 32) {
            __m256i h[4], l[4];
            for (int i = 0; i < 4; i++) {
                __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + g + 8 * i), inv));
                v = _mm256_max_epi32(_mm256_min_epi32(v, lim), nlim);
                /* v = 255 h + l with h = round(v / 255): never a tie (255 is odd), so |l| <= 127 */
                __m256 hf = _mm256_round_ps(_mm256_div_ps(_mm256_cvtepi32_ps(v), v255),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                h[i] = _mm256_cvtps_epi32(hf);
                l[i] = _mm256_sub_epi32(v, _mm256_mullo_epi32(h[i], i255));
                if (i % 2 == 1) {
                    __m256i v0 = _mm256_add_epi32(_mm256_mullo_epi32(h[i - 1], i255), l[i - 1]);
                    q.bsum[(b * QK + g) / 16 + i / 2] = hsum_i32(_mm256_add_epi32(v0, v));
                }
            }
            store_i8x32(q.hi + b * QK + g, h[0], h[1], h[2], h[3]);
            store_i8x32(q.lo + b * QK + g, l[0], l[1], l[2], l[3]);
        }
    }
}

/* Sum over 32 weights of q * x16 for u8 codes q <= 128, as two int32x8 partial sums (hi, lo)
 * weighted by a per-16-lane int16 scale vector `sc` (madd). */
static inline void dot32(__m256i q, const int8_t *h, const int8_t *l, __m256i sc, __m256i *ah, __m256i *al) {
    __m256i ph = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)h));
    __m256i pl = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)l));
    *ah = _mm256_add_epi32(*ah, _mm256_madd_epi16(ph, sc));
    *al = _mm256_add_epi32(*al, _mm256_madd_epi16(pl, sc));
}

/* acc += d * (255 * ah + al) */
static inline __m256 fold(__m256 acc, __m256i ah, __m256i al, float d) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah), _mm256_set1_ps(255.0f * d), acc);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(al), _mm256_set1_ps(d), acc);
}

static inline __m256i bytes_from_bits_32(const uint8_t *p) {
    /* 32 bits -> 32 bytes of 0x00 / 0xFF (bit i -> byte i) */
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    const __m256i bits = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    r = _mm256_or_si256(r, bits);
    return _mm256_cmpeq_epi8(r, _mm256_set1_epi64x(-1));
}

static inline __m256i nibbles16(const uint8_t *p) {
    /* 16 bytes -> 32 codes: low nibbles (values 0..15) then high nibbles (16..31) */
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* ---------------------------------------------------------------------------------------
 * one weight row . one quantized activation row
 * ------------------------------------------------------------------------------------- */

/* blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): activation scale per 256 = per 8 blocks */
static float dot_q4_0(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 18;
        float d = h2f(blk) * x->s[b / 8];
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32(nibbles16(blk + 2), x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, d);
        off += d * 8.0f * (float)(x->bsum[2 * b] + x->bsum[2 * b + 1]);
    }
    return hsum8(acc) - off;
}

static float dot_q4_1(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 20;
        float xs = x->s[b / 8];
        float d = h2f(blk) * xs, m = h2f(blk + 2) * xs;
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32(nibbles16(blk + 4), x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, d);
        off += m * (float)(x->bsum[2 * b] + x->bsum[2 * b + 1]);
    }
    return hsum8(acc) + off;
}

static float dot_q5_0(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 22;
        float d = h2f(blk) * x->s[b / 8];
        __m256i q = _mm256_or_si256(nibbles16(blk + 6),
                                    _mm256_and_si256(bytes_from_bits_32(blk + 2), _mm256_set1_epi8(0x10)));
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32(q, x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, d);
        off += d * 16.0f * (float)(x->bsum[2 * b] + x->bsum[2 * b + 1]);
    }
    return hsum8(acc) - off;
}

static float dot_q5_1(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 24;
        float xs = x->s[b / 8];
        float d = h2f(blk) * xs, m = h2f(blk + 2) * xs;
        __m256i q = _mm256_or_si256(nibbles16(blk + 8),
                                    _mm256_and_si256(bytes_from_bits_32(blk + 4), _mm256_set1_epi8(0x10)));
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32(q, x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, d);
        off += m * (float)(x->bsum[2 * b] + x->bsum[2 * b + 1]);
    }
    return hsum8(acc) + off;
}

static float dot_q8_0(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 34;
        float d = h2f(blk) * x->s[b / 8];
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        __m256i aq = _mm256_sign_epi8(q, q); /* |q| as u8 (128 for -128) */
        __m256i h = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x->hi + b * 32)), q);
        __m256i l = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x->lo + b * 32)), q);
        __m256i ah = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, h), ones);
        __m256i al = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, l), ones);
        acc = fold(acc, ah, al, d);
    }
    return hsum8(acc);
}

static inline void k_scale_min(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
}

static float dot_q4_k(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 144;
        float xs = x->s[b];
        float d = h2f(blk) * xs, dmin = h2f(blk + 2) * xs;
        uint8_t sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        const uint8_t *qs = blk + 16;
        const int8_t *h = x->hi + b * QK, *l = x->lo + b * QK;
        const int32_t *bs = x->bsum + b * 16;
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        int32_t msum = 0;
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i q0 = _mm256_and_si256(q, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            dot32(q0, h + 64 * j, l + 64 * j, _mm256_set1_epi16(sc[2 * j]), &ah, &al);
            dot32(q1, h + 64 * j + 32, l + 64 * j + 32, _mm256_set1_epi16(sc[2 * j + 1]), &ah, &al);
            msum += mn[2 * j] * (bs[4 * j] + bs[4 * j + 1]) + mn[2 * j + 1] * (bs[4 * j + 2] + bs[4 * j + 3]);
        }
        acc = fold(acc, ah, al, d);
        off += dmin * (float)msum;
    }
    return hsum8(acc) - off;
}

static float dot_q5_k(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 176;
        float xs = x->s[b];
        float d = h2f(blk) * xs, dmin = h2f(blk + 2) * xs;
        uint8_t sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        const uint8_t *qs = blk + 48;
        const int8_t *h = x->hi + b * QK, *l = x->lo + b * QK;
        const int32_t *bs = x->bsum + b * 16;
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        int32_t msum = 0;
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i h0 = _mm256_and_si256(qh, one), h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
            qh = _mm256_srli_epi16(qh, 2);
            __m256i q0 = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4));
            __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_slli_epi16(h1, 4));
            dot32(q0, h + 64 * j, l + 64 * j, _mm256_set1_epi16(sc[2 * j]), &ah, &al);
            dot32(q1, h + 64 * j + 32, l + 64 * j + 32, _mm256_set1_epi16(sc[2 * j + 1]), &ah, &al);
            msum += mn[2 * j] * (bs[4 * j] + bs[4 * j + 1]) + mn[2 * j + 1] * (bs[4 * j + 2] + bs[4 * j + 3]);
        }
        acc = fold(acc, ah, al, d);
        off += dmin * (float)msum;
    }
    return hsum8(acc) - off;
}

static float dot_q6_k(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = h2f(blk + 208) * x->s[b];
        const int8_t *h = x->hi + b * QK, *l = x->lo + b * QK;
        const int32_t *bs = x->bsum + b * 16;
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        int32_t isum = 0;
        for (int j = 0; j < 16; j++) isum += sc[j] * bs[j];
        for (int hf = 0; hf < 2; hf++) {
            const uint8_t *ql = blk + 64 * hf, *qhp = blk + 128 + 32 * hf;
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)qhp);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            for (int qq = 0; qq < 4; qq++) {
                int s = 8 * hf + 2 * qq;
                __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                int o = 128 * hf + 32 * qq;
                dot32(q[qq], h + o, l + o, scv, &ah, &al);
            }
        }
        acc = fold(acc, ah, al, d);
        off += d * 32.0f * (float)isum;
    }
    return hsum8(acc) - off;
}

typedef float (*dot_fn)(const uint8_t *, int64_t, const xq_t *);

static dot_fn pick_dot(int qtype) {
    switch (qtype) {
        case QT_Q4_0: return dot_q4_0;
        case QT_Q4_1: return dot_q4_1;
        case QT_Q5_0: return dot_q5_0;
        case QT_Q5_1: return dot_q5_1;
        case QT_Q8_0: return dot_q8_0;
        case QT_Q4_K: return dot_q4_k;
        case QT_Q5_K: return dot_q5_k;
        case QT_Q6_K: return dot_q6_k;
        default: return 0;
    }
}

/* Thread-local scratch for the quantized activations (grown on demand, never shrunk). */
static __thread void *scratch = 0;
static __thread int64_t scratch_bytes = 0;

/* y[m, N] = x[m, K] @ W.T for W = N rows of `row_bytes` GGUF bytes. K % 256 == 0.
 * Returns 0, or -1 for an unsupported type / allocation failure. */
int mk_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
              float *y, int nthreads) {
    dot_fn dot = pick_dot(qtype);
    if (!dot || K % QK) return -1;
    int64_t need = m * (2 * K + 4 * (K / QK) + 4 * (K / 16)) + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = malloc(need);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    float *xs = (float *)scratch;
    int32_t *bsum = (int32_t *)(xs + m * (K / QK));
    int8_t *hi = (int8_t *)(bsum + m * (K / 16));
    int8_t *lo = hi + m * K;
    xq_t xq[m > 0 ? m : 1];
    for (int64_t i = 0; i < m; i++) {
        xq[i].hi = hi + i * K;
        xq[i].lo = lo + i * K;
        xq[i].s = xs + i * (K / QK);
        xq[i].bsum = bsum + i * (K / 16);
        quant_row(x + i * K, K, xq[i]);
    }
    int par = nthreads > 1 && N * K * m >= PAR_MIN;
    if (m == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
        for (int64_t n = 0; n < N; n++) y[n] = dot(w + n * row_bytes, K, &xq[0]);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < m; i++) y[i * N + n] = dot(w + n * row_bytes, K, &xq[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * exact dequantization to float32 (same products, same order as the reference dequantizer)
 * ------------------------------------------------------------------------------------- */

static void deq_q4_0(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 18, o += 32) {
        float d = h2f(w);
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)((w[2 + i] & 15) - 8);
            o[i + 16] = d * (float)((w[2 + i] >> 4) - 8);
        }
    }
}

static void deq_q4_1(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 20, o += 32) {
        float d = h2f(w), m = h2f(w + 2);
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)(w[4 + i] & 15) + m;
            o[i + 16] = d * (float)(w[4 + i] >> 4) + m;
        }
    }
}

static void deq_q5_0(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 22, o += 32) {
        float d = h2f(w);
        uint32_t qh;
        memcpy(&qh, w + 2, 4);
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)((int)((w[6 + i] & 15) | (((qh >> i) & 1) << 4)) - 16);
            o[i + 16] = d * (float)((int)((w[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
        }
    }
}

static void deq_q5_1(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 24, o += 32) {
        float d = h2f(w), m = h2f(w + 2);
        uint32_t qh;
        memcpy(&qh, w + 4, 4);
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)((w[8 + i] & 15) | (((qh >> i) & 1) << 4)) + m;
            o[i + 16] = d * (float)((w[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + m;
        }
    }
}

static void deq_q8_0(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 34, o += 32) {
        float d = h2f(w);
        for (int i = 0; i < 32; i++) o[i] = (float)(int8_t)w[2 + i] * d;
    }
}

/* 32 u8 codes -> 32 floats: o = s * q - m (two roundings, like the reference; no FMA) */
static inline void store32(float *o, __m256i q, __m256 s, __m256 m) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) {
        __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
        _mm256_storeu_ps(o + 8 * i, _mm256_sub_ps(_mm256_mul_ps(s, f), m));
    }
}

static void deq_q4_k(const uint8_t *w, int64_t K, float *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < K / QK; b++, w += 144, o += QK) {
        float d = h2f(w), dmin = h2f(w + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(w + 4, sc, mn);
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * j));
            store32(o + 64 * j, _mm256_and_si256(q, m4), _mm256_set1_ps(d * (float)sc[2 * j]),
                    _mm256_set1_ps(dmin * (float)mn[2 * j]));
            store32(o + 64 * j + 32, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                    _mm256_set1_ps(d * (float)sc[2 * j + 1]), _mm256_set1_ps(dmin * (float)mn[2 * j + 1]));
        }
    }
}

static void deq_q5_k(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / QK; b++, w += 176, o += QK) {
        float d = h2f(w), dmin = h2f(w + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(w + 4, sc, mn);
        const uint8_t *qh = w + 16;
        for (int j = 0; j < 4; j++) {
            float d0 = d * sc[2 * j], m0 = dmin * mn[2 * j], d1 = d * sc[2 * j + 1], m1 = dmin * mn[2 * j + 1];
            const uint8_t *q = w + 48 + 32 * j;
            for (int i = 0; i < 32; i++) {
                int q0 = (q[i] & 15) | (((qh[i] >> (2 * j)) & 1) << 4);
                int q1 = (q[i] >> 4) | (((qh[i] >> (2 * j + 1)) & 1) << 4);
                o[64 * j + i] = d0 * (float)q0 - m0;
                o[64 * j + 32 + i] = d1 * (float)q1 - m1;
            }
        }
    }
}

static void deq_q6_k(const uint8_t *w, int64_t K, float *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    for (int64_t b = 0; b < K / QK; b++, w += 210, o += QK) {
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = h2f(w + 208);
        for (int hf = 0; hf < 2; hf++) {
            const uint8_t *ql = w + 64 * hf, *qhp = w + 128 + 32 * hf;
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)qhp);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            for (int qq = 0; qq < 4; qq++) {
                int s = 8 * hf + 2 * qq;
                float *oo = o + 128 * hf + 32 * qq;
                __m128i lo = _mm256_castsi256_si128(q[qq]), hi = _mm256_extracti128_si256(q[qq], 1);
                __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int i = 0; i < 4; i++) {
                    /* (d * sc) * (q - 32), both factors exact as in the reference */
                    __m256 dl = _mm256_set1_ps(d * (float)sc[s + i / 2]);
                    __m256 f = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), _mm256_set1_ps(32.0f));
                    _mm256_storeu_ps(oo + 8 * i, _mm256_mul_ps(dl, f));
                }
            }
        }
    }
}

typedef void (*deq_fn)(const uint8_t *, int64_t, float *);

static deq_fn pick_deq(int qtype) {
    switch (qtype) {
        case QT_Q4_0: return deq_q4_0;
        case QT_Q4_1: return deq_q4_1;
        case QT_Q5_0: return deq_q5_0;
        case QT_Q5_1: return deq_q5_1;
        case QT_Q8_0: return deq_q8_0;
        case QT_Q4_K: return deq_q4_k;
        case QT_Q5_K: return deq_q5_k;
        case QT_Q6_K: return deq_q6_k;
        default: return 0;
    }
}

/* out[N, K] = dequantized weights. Returns 0, or -1 for an unsupported type. */
int mk_dequant(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, float *out, int nthreads) {
    deq_fn deq = pick_deq(qtype);
    if (!deq) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N * K >= PAR_MIN)
    for (int64_t n = 0; n < N; n++) deq(w + n * row_bytes, K, out + n * K);
    return 0;
}

int mk_abi_version(void) { return 1; }
