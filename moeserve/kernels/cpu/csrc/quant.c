/* Activation quantization, integer dot products on GGUF blocks, the few-row matmuls (mk_matmul,
 * mk_matmul_multi), exact dequantization (mk_dequant) and the GEMMs for many rows (mk_gemm_f32,
 * mk_gemm_i16, mk_gemm). See common.h for the scheme. */

#include "common.h"

/* ---------------------------------------------------------------------------------------
 * activations
 * ------------------------------------------------------------------------------------- */

/* four int32x8 (each in -127..127) -> 32 int8 in order */
static inline void store_i8x32(int8_t *dst, __m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    __m256i r = _mm256_packs_epi16(ab, cd);
    r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)dst, r);
}

/* max |x| over one block of 256 values (the activation quantizers' block scale) */
static inline float absmax256(const float *xb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < QK; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}

void quant_row(const float *x, int64_t K, xq_t q) {
    const __m256 v255 = _mm256_set1_ps(255.0f);
    const __m256i lim = _mm256_set1_epi32(32512), nlim = _mm256_set1_epi32(-32512), i255 = _mm256_set1_epi32(255);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        const float amax = absmax256(xb);
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
            const int32_t *bs = q.bsum + (b * QK + g) / 16;
            q.fb[(b * QK + g) / 32] = (float)(bs[0] + bs[1]) * q.s[b];
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
    *ah = madd_add(*ah, ph, sc);
    *al = madd_add(*al, pl, sc);
}

/* dot32 for signed int8 weights v: |v| as u8 (128 for -128, still exact) against the activations with v's sign,
 * so the pair sums stay within pmaddubsw's int16 (2 * 128 * 127) */
static inline void dot32_signed(__m256i v, const int8_t *h, const int8_t *l, __m256i sc, __m256i *ah, __m256i *al) {
    const __m256i av = _mm256_sign_epi8(v, v);
    __m256i ph = _mm256_maddubs_epi16(av, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)h), v));
    __m256i pl = _mm256_maddubs_epi16(av, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)l), v));
    *ah = madd_add(*ah, ph, sc);
    *al = madd_add(*al, pl, sc);
}

/* acc += d * (255 * ah + al) */
static inline __m256 fold(__m256 acc, __m256i ah, __m256i al, float d) {
    __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah), _mm256_set1_ps(255.0f), _mm256_cvtepi32_ps(al));
    return _mm256_fmadd_ps(t, _mm256_set1_ps(d), acc);
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
        if (!(b & 1)) PREFETCH(blk);
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
        if (!(b & 1)) PREFETCH(blk);
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
        if (!(b & 1)) PREFETCH(blk);
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
        if (!(b & 1)) PREFETCH(blk);
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
        PREFETCH(blk);
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32_signed(_mm256_loadu_si256((const __m256i *)(blk + 2)), x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, h2f(blk) * x->s[b / 8]);
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

/* The 12 packed 6-bit scales and mins of a Q4_K/Q5_K block -> bytes sc[0..7], mn[0..7] (the same
 * values as k_scale_min, four at a time). */
static inline __m128i k_scale_min_v(const uint8_t *s) {
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    uint32_t u[4];
    memcpy(u, s, 12);
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t mins_lo = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins_lo;
    u[0] &= m1;
    return _mm_loadu_si128((const __m128i *)u);
}

/* int16 sub-block scales broadcast to 16 lanes: pshufb mask picking the int16 at index i */
static inline __m256i pick16(int i) { return _mm256_set1_epi16((short)((2 * i) | ((2 * i + 1) << 8))); }

/* mn[s] * fb[s] for the block's eight sub-blocks (fb: the activation's s * Sum(x16) per 32 values).
 * In float32: ~2e-8 relative rounding, and ~5 vector ops fewer per block than exact int32 products,
 * which measured 12-17 % of a Q4_K dot. */
static inline __m256 k_min_f(__m128i scm, const float *fb) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8))), _mm256_loadu_ps(fb));
}

static float dot_q5_k(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps(), vmin = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 176;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + 128);
        const float d = h2f(blk) * x->s[b];
        __m128i scm = k_scale_min_v(blk + 4);
        __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
        vmin = _mm256_fmadd_ps(k_min_f(scm, x->fb + 8 * b), _mm256_set1_ps(h2f(blk + 2)), vmin);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        const uint8_t *qs = blk + 48;
        const int8_t *h = x->hi + b * QK, *l = x->lo + b * QK;
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i h0 = _mm256_and_si256(qh, one), h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
            qh = _mm256_srli_epi16(qh, 2);
            __m256i q0 = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4));
            __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_slli_epi16(h1, 4));
            dot32(q0, h + 64 * j, l + 64 * j, _mm256_shuffle_epi8(sc16, pick16(2 * j)), &ah, &al);
            dot32(q1, h + 64 * j + 32, l + 64 * j + 32, _mm256_shuffle_epi8(sc16, pick16(2 * j + 1)), &ah, &al);
        }
        acc = fold(acc, ah, al, d);
    }
    return hsum8(_mm256_sub_ps(acc, vmin));
}

/* Q6_K: pshufb masks giving sc[2qq] (as int16) in the low 128-bit lane and sc[2qq+1] in the high
 * one, from a vector holding one half's eight int16 scales in both lanes. */
static inline __m256i q6_pick(int qq) {
    int lo = 2 * qq, hi = 2 * qq + 1;
    return _mm256_setr_m128i(_mm_set1_epi16((short)((2 * lo) | ((2 * lo + 1) << 8))),
                             _mm_set1_epi16((short)((2 * hi) | ((2 * hi + 1) << 8))));
}

/* Q6_K: one half-block (128 weights) -> 4 x 32 six-bit codes (0..63), q[i] = weights 32 i .. 32 i + 31
 * of the half, from its 64 bytes of low nibbles `ql` and 32 bytes of high bit pairs `qh` */
static inline void q6_codes(const uint8_t *ql, const uint8_t *qhp, __m256i q[4]) {
    /* the high bit pair j of each qh byte lands on bits 4-5 with one 16-bit shift and a 0x30 mask
     * (bits shifted across the byte boundary are masked away): 3 shifts instead of 7 */
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
    __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    __m256i qh = _mm256_loadu_si256((const __m256i *)qhp);
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

/* ---------------------------------------------------------------------------------------
 * one weight row . up to 4 activation rows (Q4_K, Q6_K; one row is dot_q4_k / dot_q6_k)
 *
 * The same integer arithmetic as the other dots, but each block's scales, mins and 6-/4-bit
 * codes are decoded once for all the activations: on this CPU decoding is ~80 % of a dot's cost
 * (dropping half the multiplies saved only ~20 %), so batched decode, which dots each weight row with
 * several tokens, pays it once instead of once per token. NA is a compile-time constant (1..4).
 * ------------------------------------------------------------------------------------- */

/* always_inline: as a call from dot_q4_k it cost ~6 % on 768-wide rows (MoE down) */
static inline __attribute__((always_inline)) void dotn_q4_k(const uint8_t *w, int64_t K, const xq_t *const *x,
                                                            float *out, const int NA) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4], vmin[4];
    for (int a = 0; a < NA; a++) acc[a] = vmin[a] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 144;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + 128);
        const float d = h2f(blk);
        const __m256 vdmin = _mm256_set1_ps(h2f(blk + 2));
        __m128i scm = k_scale_min_v(blk + 4);
        __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
        const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8)));
        __m256i ah[4], al[4];
        for (int a = 0; a < NA; a++) {
            vmin[a] = _mm256_fmadd_ps(_mm256_mul_ps(mnf, _mm256_loadu_ps(x[a]->fb + 8 * b)), vdmin, vmin[a]);
            ah[a] = al[a] = _mm256_setzero_si256();
        }
        const uint8_t *qs = blk + 16;
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i q0 = _mm256_and_si256(q, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            __m256i s0 = _mm256_shuffle_epi8(sc16, pick16(2 * j)), s1 = _mm256_shuffle_epi8(sc16, pick16(2 * j + 1));
            for (int a = 0; a < NA; a++) {
                const int8_t *h = x[a]->hi + b * QK + 64 * j, *l = x[a]->lo + b * QK + 64 * j;
                dot32(q0, h, l, s0, &ah[a], &al[a]);
                dot32(q1, h + 32, l + 32, s1, &ah[a], &al[a]);
            }
        }
        for (int a = 0; a < NA; a++) acc[a] = fold(acc[a], ah[a], al[a], d * x[a]->s[b]);
    }
    for (int a = 0; a < NA; a++) out[a] = hsum8(_mm256_sub_ps(acc[a], vmin[a]));
}

static inline __attribute__((always_inline)) void dotn_q6_k(const uint8_t *w, int64_t K, const xq_t *const *x,
                                                            float *out, const int NA) {
    __m256 acc[4], voff[4];
    for (int a = 0; a < NA; a++) acc[a] = voff[a] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 210;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + 128);
        PREFETCH(blk + 192);
        __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
        const float d = h2f(blk + 208);
        const __m256i sclo = _mm256_cvtepi8_epi32(sc8), schi = _mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8));
        __m256i ah[4], al[4];
        for (int a = 0; a < NA; a++) {
            const int32_t *bs = x[a]->bsum + b * 16;
            __m256i is = _mm256_add_epi32(_mm256_mullo_epi32(sclo, _mm256_loadu_si256((const __m256i *)bs)),
                                          _mm256_mullo_epi32(schi, _mm256_loadu_si256((const __m256i *)(bs + 8))));
            voff[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(32.0f * d * x[a]->s[b]), voff[a]);
            ah[a] = al[a] = _mm256_setzero_si256();
        }
        __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        for (int hf = 0; hf < 2; hf++) {
            const uint8_t *ql = blk + 64 * hf, *qhp = blk + 128 + 32 * hf;
            __m256i half = hf ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            __m256i q[4];
            q6_codes(ql, qhp, q);
            for (int qq = 0; qq < 4; qq++) {
                const int o = 128 * hf + 32 * qq;
                const __m256i sc = _mm256_shuffle_epi8(half, q6_pick(qq));
                for (int a = 0; a < NA; a++)
                    dot32(q[qq], x[a]->hi + b * QK + o, x[a]->lo + b * QK + o, sc, &ah[a], &al[a]);
            }
        }
        for (int a = 0; a < NA; a++) acc[a] = fold(acc[a], ah[a], al[a], d * x[a]->s[b]);
    }
    for (int a = 0; a < NA; a++) out[a] = hsum8(_mm256_sub_ps(acc[a], voff[a]));
}

static float dot_q4_k(const uint8_t *w, int64_t K, const xq_t *x) {
    float r;
    dotn_q4_k(w, K, &x, &r, 1);
    return r;
}

static float dot_q6_k(const uint8_t *w, int64_t K, const xq_t *x) {
    float r;
    dotn_q6_k(w, K, &x, &r, 1);
    return r;
}

/* ---------------------------------------------------------------------------------------
 * Q2_K and Q3_K: 2-bit codes (per 128 weights, 32 bytes whose bit pairs 2j..2j+1 are weights 32j..32j+31)
 * with a scale per 16 weights; Q2_K adds a min per 16 weights (w = d * sc * q - dmin * m), Q3_K a third bit
 * from a 32-byte mask (bit 4h + j of byte l: weight 128h + 32j + l) that is clear for codes 4 below
 * (w = d * (sc - 32) * (q - 4 * !bit)). As in Q6_K, the codes enter the products unsigned (q | bit << 2
 * for Q3_K) and the offset is taken once per sub-block from the activation's per-16 sums.
 * ------------------------------------------------------------------------------------- */

/* Q3_K's 12 scale bytes -> its sixteen signed scales sc - 32 (int8): the low nibbles are bytes 0-7 (scales
 * 0-7 low, 8-15 high), the top bit pairs bytes 8-11 (bits 2(s / 4).. of byte 8 + s % 4) */
static inline __m128i q3_scales(const uint8_t *s) {
    const uint32_t m2 = 0x0f0f0f0f, m3 = 0x03030303;
    uint32_t u[3], o[4];
    memcpy(u, s, 12);
    o[0] = (u[0] & m2) | ((u[2] & m3) << 4);
    o[1] = (u[1] & m2) | (((u[2] >> 2) & m3) << 4);
    o[2] = ((u[0] >> 4) & m2) | (((u[2] >> 4) & m3) << 4);
    o[3] = ((u[1] >> 4) & m2) | (((u[2] >> 6) & m3) << 4);
    return _mm_sub_epi8(_mm_loadu_si128((const __m128i *)o), _mm_set1_epi8(32));
}

/* 32 codes for weights 128 hf + 32 j + (0..31): bit pair j of the half's code bytes q, and for Q3_K (q3) bit
 * 4 hf + j of the mask bytes hm as bit 2 (codes 0..7; Q2_K: 0..3) */
static inline __m256i q23_codes(__m256i q, __m256i hm, int hf, int j, const int q3) {
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3));
    if (!q3) return lo;
    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * hf + j), _mm256_set1_epi8(1));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hb, 2));
}

/* the offsets' Sum(scale[s] * x16 sum of sub-block s) over a block's 16 sub-blocks, as float32 lanes */
static inline __m256 sub_sums(__m128i v8, int is_signed, const int32_t *bs) {
    const __m256i lo = is_signed ? _mm256_cvtepi8_epi32(v8) : _mm256_cvtepu8_epi32(v8);
    const __m128i h8 = _mm_srli_si128(v8, 8);
    const __m256i hi = is_signed ? _mm256_cvtepi8_epi32(h8) : _mm256_cvtepu8_epi32(h8);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_mullo_epi32(lo, _mm256_loadu_si256((const __m256i *)bs)),
                                               _mm256_mullo_epi32(hi, _mm256_loadu_si256((const __m256i *)(bs + 8)))));
}

/* Q2_K (q3 = 0) or Q3_K (q3 = 1) row . x: the header gives the sixteen scales, the block scale and the offsets
 * (Q2_K: dmin * m, Q3_K: 4 * (sc - 32)); the eight 32-code vectors and their per-16 scales are the same loop */
static inline __attribute__((always_inline)) float dot_q23_k(const uint8_t *w, int64_t K, const xq_t *x,
                                                            const int q3) {
    const int64_t bytes = q3 ? 110 : 84;
    __m256 acc = _mm256_setzero_ps(), voff = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * bytes;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        float d;
        __m256i sc16, hm = _mm256_setzero_si256();
        const uint8_t *qs;
        if (q3) {
            const __m128i sc8 = q3_scales(blk + 96);
            d = h2f(blk + 108) * x->s[b];
            voff = _mm256_fmadd_ps(sub_sums(sc8, 1, x->bsum + b * 16), _mm256_set1_ps(4.0f * d), voff);
            sc16 = _mm256_cvtepi8_epi16(sc8);
            hm = _mm256_loadu_si256((const __m256i *)blk);
            qs = blk + 32;
        } else {
            const __m128i m4 = _mm_set1_epi8(0x0F), sm = _mm_loadu_si128((const __m128i *)blk);
            const __m128i mn8 = _mm_and_si128(_mm_srli_epi16(sm, 4), m4);
            voff = _mm256_fmadd_ps(sub_sums(mn8, 0, x->bsum + b * 16), _mm256_set1_ps(h2f(blk + 82) * x->s[b]), voff);
            d = h2f(blk + 80) * x->s[b];
            sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4));
            qs = blk + 16;
        }
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        for (int hf = 0; hf < 2; hf++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * hf));
            const __m256i half = _mm256_permute2x128_si256(sc16, sc16, hf ? 0x11 : 0x00);
            for (int j = 0; j < 4; j++) {
                const int o = 128 * hf + 32 * j;
                dot32(q23_codes(q, hm, hf, j, q3), x->hi + b * QK + o, x->lo + b * QK + o,
                      _mm256_shuffle_epi8(half, q6_pick(j)), &ah, &al);
            }
        }
        acc = fold(acc, ah, al, d);
    }
    return hsum8(_mm256_sub_ps(acc, voff));
}

static float dot_q2_k(const uint8_t *w, int64_t K, const xq_t *x) { return dot_q23_k(w, K, x, 0); }

static float dot_q3_k(const uint8_t *w, int64_t K, const xq_t *x) { return dot_q23_k(w, K, x, 1); }

/* ---------------------------------------------------------------------------------------
 * IQ4_NL (32 weights: fp16 d, 16 code bytes) and IQ4_XS (256 weights: fp16 d, the sub-block scales' top 2 bits
 * (uint16) and low nibbles (4 bytes), 128 code bytes): a 4-bit code stands for one of sixteen int8 grid values
 * (kvalues_iq4nl), looked up with one pshufb per 32 weights. The values are signed, so they enter pmaddubsw as
 * |v| against the activation with v's sign (as Q8_0's): |v| <= 127 keeps the pair sums unsaturated.
 * ------------------------------------------------------------------------------------- */

/* 16 code bytes -> the 32 weights' grid values (int8), in weight order */
static inline __m256i iq4_values(const uint8_t *p) {
    const __m128i grid = _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(grid), nibbles16(p));
}

/* IQ4_XS block header -> its eight sub-block scales ls - 32 as int16, in both 128-bit lanes (for pick16): scale s
 * has its low nibble at bits 4s.. of the little-endian uint32 at byte 4 and its top 2 bits at bits 2s.. of the
 * uint16 at byte 2 */
static inline __m256i iq4_xs_scales(const uint8_t *blk) {
    uint32_t lo;
    uint16_t hi;
    memcpy(&lo, blk + 4, 4);
    memcpy(&hi, blk + 2, 2);
    const __m256i l = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)lo), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                       _mm256_set1_epi32(15));
    const __m256i h = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(hi), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                       _mm256_set1_epi32(3));
    const __m256i s = _mm256_sub_epi32(_mm256_or_si256(l, _mm256_slli_epi32(h, 4)), _mm256_set1_epi32(32));
    return _mm256_broadcastsi128_si256(_mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

static float dot_iq4_nl(const uint8_t *w, int64_t K, const xq_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 18;
        if (!(b & 1)) PREFETCH(blk);
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        dot32_signed(iq4_values(blk + 2), x->hi + b * 32, x->lo + b * 32, ones, &ah, &al);
        acc = fold(acc, ah, al, h2f(blk) * x->s[b / 8]);
    }
    return hsum8(acc);
}

static float dot_iq4_xs(const uint8_t *w, int64_t K, const xq_t *x) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *blk = w + b * 136;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + 128);
        const __m256i sc16 = iq4_xs_scales(blk);
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++)
            dot32_signed(iq4_values(blk + 8 + 16 * s), x->hi + b * QK + 32 * s, x->lo + b * QK + 32 * s,
                         _mm256_shuffle_epi8(sc16, pick16(s)), &ah, &al);
        acc = fold(acc, ah, al, h2f(blk) * x->s[b]);
    }
    return hsum8(acc);
}

/* out[a] = row . x[a] for a < n (n >= 1), in groups of up to 4 activations per pass over the row.
 * Returns 0 for one activation or a type without a multi-activation kernel: the caller loops the
 * single-row dot. */
#define DOT_GROUP 4 /* activations per pass over a row (measured: 2 and 3 were slower at m = 4) */
int dot_multi(int qtype, const uint8_t *w, int64_t K, const xq_t *const *x, int64_t n, float *out) {
    if ((qtype != QT_Q4_K && qtype != QT_Q6_K) || n < 2) return 0; /* one activation: the plain dot */
    for (int64_t a = 0; a < n; a += DOT_GROUP) {
        const int64_t r = n - a < DOT_GROUP ? n - a : DOT_GROUP;
        if (qtype == QT_Q4_K) {
            if (r == 4) dotn_q4_k(w, K, x + a, out + a, 4);
            else if (r == 3) dotn_q4_k(w, K, x + a, out + a, 3);
            else if (r == 2) dotn_q4_k(w, K, x + a, out + a, 2);
            else dotn_q4_k(w, K, x + a, out + a, 1);
        } else {
            if (r == 4) dotn_q6_k(w, K, x + a, out + a, 4);
            else if (r == 3) dotn_q6_k(w, K, x + a, out + a, 3);
            else if (r == 2) dotn_q6_k(w, K, x + a, out + a, 2);
            else dotn_q6_k(w, K, x + a, out + a, 1);
        }
    }
    return 1;
}


dot_fn pick_dot(int qtype) {
    switch (qtype) {
        case QT_Q4_0: return dot_q4_0;
        case QT_Q4_1: return dot_q4_1;
        case QT_Q5_0: return dot_q5_0;
        case QT_Q5_1: return dot_q5_1;
        case QT_Q8_0: return dot_q8_0;
        case QT_Q2_K: return dot_q2_k;
        case QT_Q3_K: return dot_q3_k;
        case QT_Q4_K: return dot_q4_k;
        case QT_Q5_K: return dot_q5_k;
        case QT_Q6_K: return dot_q6_k;
        case QT_IQ4_NL: return dot_iq4_nl;
        case QT_IQ4_XS: return dot_iq4_xs;
        default: return 0;
    }
}

/* Thread-local scratch for the quantized activations (grown on demand, never shrunk). */
static __thread void *scratch = 0;
static __thread int64_t scratch_bytes = 0;

/* y_j[m, N_j] = x[m, K] @ W_j.T for nm matrices sharing the input (e.g. an attention layer's q, k and
 * v projections): x is quantized once and all the rows are shared out in one parallel region, so
 * the three small calls' fixed costs (call, quantization, fork/join) are paid once. K % 256 == 0.
 * Returns 0, or -1 for an unsupported type / allocation failure. */
int mk_matmul_multi(const mk_mat_t *mats, int64_t nm, int64_t K, const float *x, int64_t m, int nthreads) {
    if (K % QK || nm < 1 || nm > 8 || m < 0) return -1;
    int64_t first[9], total = 0;
    dot_fn dots[8];
    for (int64_t j = 0; j < nm; j++) {
        dots[j] = pick_dot(mats[j].qtype);
        if (!dots[j]) return -1;
        first[j] = total;
        total += mats[j].N;
    }
    first[nm] = total;
    if (m == 0) return 0;
    int64_t need = m * (2 * K + 4 * (K / QK) + 4 * (K / 16) + 4 * (K / 32)) + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = malloc(need);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    float *xs = (float *)scratch;
    int32_t *bsum = (int32_t *)(xs + m * (K / QK));
    float *fb = (float *)(bsum + m * (K / 16));
    int8_t *hi = (int8_t *)(fb + m * (K / 32));
    int8_t *lo = hi + m * K;
    xq_t xq[m];
    const xq_t *xp[m];
    for (int64_t i = 0; i < m; i++) {
        xq[i].hi = hi + i * K;
        xq[i].lo = lo + i * K;
        xq[i].s = xs + i * (K / QK);
        xq[i].bsum = bsum + i * (K / 16);
        xq[i].fb = fb + i * (K / 32);
        quant_row(x + i * K, K, xq[i]);
        xp[i] = &xq[i];
    }
    int par = nthreads > 1 && total * K * m >= PAR_MIN;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
    for (int64_t r = 0; r < total; r++) {
        int64_t j = 0;
        while (r >= first[j + 1]) j++;
        const mk_mat_t *M = &mats[j];
        const int64_t n = r - first[j];
        const uint8_t *row = M->w + n * M->row_bytes;
        if (m == 1) {
            M->y[n] = dots[j](row, K, &xq[0]);
            continue;
        }
        float o[m];
        if (!dot_multi(M->qtype, row, K, xp, m, o))
            for (int64_t i = 0; i < m; i++) o[i] = dots[j](row, K, &xq[i]);
        for (int64_t i = 0; i < m; i++) M->y[i * M->N + n] = o[i];
    }
    return 0;
}

/* y[m, N] = x[m, K] @ W.T for W = N rows of `row_bytes` GGUF bytes (the one-matrix case). */
int mk_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
              float *y, int nthreads) {
    const mk_mat_t mat = {qtype, 0, w, row_bytes, N, y};
    return mk_matmul_multi(&mat, 1, K, x, m, nthreads);
}

/* ---------------------------------------------------------------------------------------
 * exact dequantization to float32 (same products, same order as the reference dequantizer)
 * ------------------------------------------------------------------------------------- */

/* 32 int8 codes -> 32 floats d * c, with d = d0 for the first 16 and d1 for the last 16 (one rounding) */
static inline void store32_i8(float *o, __m256i c, float d0, float d1) {
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++)
        _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_set1_ps(i < 2 ? d0 : d1),
                                                  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i]))));
}

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
        const float d = h2f(w);
        store32_i8(o, _mm256_loadu_si256((const __m256i *)(w + 2)), d, d);
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
    const __m256i k32 = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < K / QK; b++, w += 210, o += QK) {
        /* (d * sc) * (q - 32) as in the reference: both factors are exact in float32 (q - 32 taken in
         * int8), so the one rounding of the product is the reference's */
        float dsc[16];
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(w + 192));
        const __m256 d = _mm256_set1_ps(h2f(w + 208));
        _mm256_storeu_ps(dsc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))));
        _mm256_storeu_ps(dsc + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))));
        for (int hf = 0; hf < 2; hf++) {
            const uint8_t *ql = w + 64 * hf, *qhp = w + 128 + 32 * hf;
            __m256i q[4];
            q6_codes(ql, qhp, q);
            for (int qq = 0; qq < 4; qq++) {
                const int s = 8 * hf + 2 * qq;
                store32_i8(o + 128 * hf + 32 * qq, _mm256_sub_epi8(q[qq], k32) /* -32..31 */, dsc[s], dsc[s + 1]);
            }
        }
    }
}

/* Q2_K: (d * sc) * q - dmin * m, two roundings as in the reference (no FMA: -ffp-contract=off) */
static void deq_q2_k(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / QK; b++, w += 84, o += QK) {
        const float d = h2f(w + 80), dmin = h2f(w + 82);
        for (int i = 0; i < QK; i++) {
            const int s = i / 16, q = (w[16 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
            o[i] = (d * (float)(w[s] & 15)) * (float)q - dmin * (float)(w[s] >> 4);
        }
    }
}

/* Q3_K: (d * (sc - 32)) * (q - 4 * !bit), both factors exact in float32: the reference's one rounding */
static void deq_q3_k(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / QK; b++, w += 110, o += QK) {
        int8_t sc[16];
        _mm_storeu_si128((__m128i *)sc, q3_scales(w + 96));
        const float d = h2f(w + 108);
        for (int i = 0; i < QK; i++) {
            const int hf = i / 128, j = (i / 32) % 4, l = i % 32;
            const int q = ((w[32 + 32 * hf + l] >> (2 * j)) & 3) - (((w[l] >> (4 * hf + j)) & 1) ? 0 : 4);
            o[i] = (d * (float)sc[i / 16]) * (float)q;
        }
    }
}

static void deq_iq4_nl(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / 32; b++, w += 18, o += 32) {
        const float d = h2f(w);
        store32_i8(o, iq4_values(w + 2), d, d);
    }
}

/* IQ4_XS: (d * (ls - 32)) * v, the first factor exact in float32: the reference's one rounding */
static void deq_iq4_xs(const uint8_t *w, int64_t K, float *o) {
    for (int64_t b = 0; b < K / QK; b++, w += 136, o += QK) {
        int16_t sc[16];
        _mm256_storeu_si256((__m256i *)sc, iq4_xs_scales(w));
        const float d = h2f(w);
        for (int s = 0; s < 8; s++) {
            const float dl = d * (float)sc[s];
            store32_i8(o + 32 * s, iq4_values(w + 8 + 16 * s), dl, dl);
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
        case QT_Q2_K: return deq_q2_k;
        case QT_Q3_K: return deq_q3_k;
        case QT_Q4_K: return deq_q4_k;
        case QT_Q5_K: return deq_q5_k;
        case QT_Q6_K: return deq_q6_k;
        case QT_IQ4_NL: return deq_iq4_nl;
        case QT_IQ4_XS: return deq_iq4_xs;
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

/* ---------------------------------------------------------------------------------------
 * tiled float32 GEMM for many activation rows (prefill, batched decode) of Q4_0..Q8_0 (`mk_gemm`), and of
 * every type as `mk_gemm_f32` (the K-quants take the integer GEMM of the next section)
 *
 * The integer kernel above decodes every weight again for each activation row, so its cost grows
 * with m. Here each thread dequantizes a tile of GT_ROWS weight rows to exact float32 (the same
 * values as the reference dequantizer) into its own buffer, which stays in L2, and multiplies it
 * with all m activation rows by a float32 FMA micro-kernel: 6 weight rows (broadcast) x 16
 * activation rows (two 8-float vectors, from a transposed copy of x packed once per call) in 12
 * accumulators. Decoding costs ~0.15 ns per weight once per call instead of once per row, and
 * the products run at the FMA units' rate. The dequantized weights never leave the cache: no
 * float32 copy of a matrix is written to memory (the lm_head's would be 1.2 GB).
 * ------------------------------------------------------------------------------------- */

#define GT_ROWS 24 /* weight rows per tile (K = 2048: 192 KB of float32 per thread) */
#define GM_R 6     /* weight rows per micro-kernel call */
#define GM_C 16    /* activation rows per packed panel */

/* c[r][i] = Sum_k w[r][k] * xp[k][i] for r < 6, i < 16 (xp: panel of 16 columns) */
static void ukernel_6x16(const float *w, int64_t ldw, const float *xp, int64_t K, float *c) {
    __m256 a[GM_R][2];
    for (int r = 0; r < GM_R; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 x0 = _mm256_loadu_ps(xp + 16 * k), x1 = _mm256_loadu_ps(xp + 16 * k + 8);
        for (int r = 0; r < GM_R; r++) {
            __m256 b = _mm256_broadcast_ss(w + r * ldw + k);
            a[r][0] = _mm256_fmadd_ps(b, x0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(b, x1, a[r][1]);
        }
    }
    for (int r = 0; r < GM_R; r++) {
        _mm256_storeu_ps(c + 16 * r, a[r][0]);
        _mm256_storeu_ps(c + 16 * r + 8, a[r][1]);
    }
}

/* the same for a panel of 8 columns (the last one, when at most 8 activation rows remain) */
static void ukernel_6x8(const float *w, int64_t ldw, const float *xp, int64_t K, float *c) {
    __m256 a[GM_R];
    for (int r = 0; r < GM_R; r++) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 x0 = _mm256_loadu_ps(xp + 8 * k);
        for (int r = 0; r < GM_R; r++) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * ldw + k), x0, a[r]);
    }
    for (int r = 0; r < GM_R; r++) _mm256_storeu_ps(c + 16 * r, a[r]);
}

static __thread void *gemm_tile = 0;
static __thread int64_t gemm_tile_bytes = 0;
static __thread void *gemm_xp = 0;
static __thread int64_t gemm_xp_bytes = 0;

/* y[m, N] = x[m, K] @ dequant(W).T with exact float32 weights, W = N rows of `row_bytes` GGUF bytes, K % 256 == 0
 * (`mk_gemm` for Q4_0..Q8_0). Returns 0, or -1 for an unsupported type / allocation failure. */
int mk_gemm_f32(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
                float *y, int nthreads) {
    deq_fn deq = pick_deq(qtype);
    if (!deq || K % QK || m <= 0) return -1;
    const int64_t npanel = (m + GM_C - 1) / GM_C, ntile = (N + GT_ROWS - 1) / GT_ROWS;
    float *xp = (float *)grow_bytes(&gemm_xp, &gemm_xp_bytes, 4 * npanel * GM_C * K);
    if (!xp) return -1;
    int failed = 0;
    int par = nthreads > 1 && N * K * m >= PAR_MIN;
#pragma omp parallel num_threads(nthreads) if (par)
    {
        /* x -> panels of 16 (the last of 8 when <= 8 rows remain), transposed: xp[p][k][i] */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < npanel; p++) {
            const int64_t i0 = p * GM_C, rows = m - i0 < GM_C ? m - i0 : GM_C, width = rows <= 8 ? 8 : GM_C;
            float *dst = xp + p * GM_C * K;
            for (int64_t k = 0; k < K; k++)
                for (int64_t i = 0; i < width; i++) dst[k * width + i] = i < rows ? x[(i0 + i) * K + k] : 0.0f;
        }
        float *wt = (float *)grow_bytes(&gemm_tile, &gemm_tile_bytes, 4 * GT_ROWS * K);
        if (!wt) {
#pragma omp atomic write
            failed = 1;
        }
        float c[GM_R * GM_C];
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntile; t++) {
            if (!wt) continue;
            const int64_t n0 = t * GT_ROWS, rows = N - n0 < GT_ROWS ? N - n0 : GT_ROWS;
            for (int64_t r = 0; r < rows; r++) deq(w + (n0 + r) * row_bytes, K, wt + r * K);
            const int64_t rows6 = (rows + GM_R - 1) / GM_R * GM_R;
            if (rows6 > rows) memset(wt + rows * K, 0, (rows6 - rows) * K * sizeof(float));
            for (int64_t p = 0; p < npanel; p++) {
                const int64_t i0 = p * GM_C, prow = m - i0 < GM_C ? m - i0 : GM_C;
                for (int64_t g = 0; g < rows6; g += GM_R) {
                    if (prow <= 8)
                        ukernel_6x8(wt + g * K, K, xp + p * GM_C * K, K, c);
                    else
                        ukernel_6x16(wt + g * K, K, xp + p * GM_C * K, K, c);
                    const int64_t gr = rows - g < GM_R ? rows - g : GM_R;
                    for (int64_t i = 0; i < prow; i++)
                        for (int64_t r = 0; r < gr; r++) y[(i0 + i) * N + n0 + g + r] = c[16 * r + i];
                }
            }
        }
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------
 * integer GEMM for the K-quants (Q2_K..Q6_K): 16-bit products, decoded once per tile
 *
 * Why: the float32 GEMM above runs at the FMA units' peak (8 multiply-adds per instruction), and
 * spends a quarter of its time writing float32 weights. Here a tile of weight rows is decoded to
 * int16 w16 = q * sc (the sub-block scale folded in: |q * sc| <= 32 * 128 = 4096 for Q6_K's signed
 * codes, <= 4 * 32 for Q3_K's, <= 31 * 63 for Q4_K/Q5_K) and the activations are quantized per 256 values to
 * int16 x16, |x16| <= 16383. One pmaddwd multiplies 16 weight-activation pairs (twice the FMA's 8)
 * and the int32 sums of a whole 256-value block cannot overflow: 32 products per lane, each
 * <= 4096 * 16383, sum <= 2^31 - 1. Each block's sums are converted to float32 and scaled by the
 * block scale d times the activation scale; Q4_K/Q5_K mins use the activation's per-32 sums, Q2_K's (one per 16
 * values) its per-16 sums.
 *
 * Relative activation error ~2^-15 of the block maximum (the few-row integer kernel: ~2^-16; the
 * float32 GEMM: none): this GEMM is not bit-identical to either, and is checked against the
 * dequantized float64 reference.
 * ------------------------------------------------------------------------------------- */

#define X16_MAX 16383.0f
#define IG_NT 16 /* weight rows per tile (decoded once per tile) */
#define IG_MC 16 /* activation rows per chunk: a block's slices of x and w and the chunk's accumulators stay in L1 */
#define IG_MR 4  /* activation rows per micro-kernel */
#define IG_NR 2  /* weight rows per micro-kernel */
#define IG_MMAX 64 /* activation rows per call (more are done in chunks; each chunk decodes the weights again) */

/* x [K] -> x16 (block b at q + b * ldq), s [K / 256] (x = s * x16), fs: s * Sum(x16) per `fg` (32, or 16 for Q2_K's
 * mins) values */
static void quant_row_i16(const float *x, int64_t K, int16_t *q, int64_t ldq, float *s, float *fs, int fg) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        const float amax = absmax256(xb);
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? X16_MAX / amax : 0.0f);
        s[b] = amax / X16_MAX;
        for (int g = 0; g < QK; g += 16) {
            __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + g), inv));
            __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + g + 8), inv));
            __m256i lim = _mm256_set1_epi32(16383), nlim = _mm256_set1_epi32(-16383);
            v0 = _mm256_max_epi32(_mm256_min_epi32(v0, lim), nlim);
            v1 = _mm256_max_epi32(_mm256_min_epi32(v1, lim), nlim);
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xD8);
            _mm256_storeu_si256((__m256i *)(q + b * ldq + g), p);
            const int32_t t = hsum_i32(_mm256_add_epi32(v0, v1));
            if (fg == 16) fs[(b * QK + g) / 16] = (float)t * s[b];
            else if (g % 32 == 0) fs[(b * QK + g) / 32] = (float)t;
            else fs[(b * QK + g) / 32] = (fs[(b * QK + g) / 32] + (float)t) * s[b];
        }
    }
}

/* 32 codes c (int8) with int16 sub-block scale vectors sa (first 16) and sb (last 16) -> 32 int16 q * sc */
static inline void put16x2(int16_t *o, __m256i c, __m256i sa, __m256i sb, int is_signed) {
    __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    __m256i a = is_signed ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
    __m256i b = is_signed ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
    _mm256_storeu_si256((__m256i *)o, _mm256_mullo_epi16(a, sa));
    _mm256_storeu_si256((__m256i *)(o + 16), _mm256_mullo_epi16(b, sb));
}

/* Q4_K/Q5_K block header -> d, the eight mins dmin * m (float) and the eight scales as int16 in both 128-bit
 * lanes (for pick16) */
static inline __m256i k_header(const uint8_t *w, float *d, float *mn) {
    const __m128i scm = k_scale_min_v(w + 4);
    *d = h2f(w);
    _mm256_storeu_ps(mn, _mm256_mul_ps(_mm256_set1_ps(h2f(w + 2)),
                                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8)))));
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
}

/* One weight row -> w16 (block b at o + b * ldo: tiles are stored block-major, so that one block of all
 * the rows is contiguous; rows 4 KB apart would share L1 sets), block scales d [K / 256] and (Q4_K/Q5_K)
 * mins mn [K / 256][8] = dmin * m */
static void unpack_q4_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < K / QK; b++, w += 144, o += ldo) {
        const __m256i sc16 = k_header(w, d + b, mn + 8 * b);
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * j));
            const __m256i s0 = _mm256_shuffle_epi8(sc16, pick16(2 * j)), s1 = _mm256_shuffle_epi8(sc16, pick16(2 * j + 1));
            put16x2(o + 64 * j, _mm256_and_si256(q, m4), s0, s0, 0);
            put16x2(o + 64 * j + 32, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), s1, s1, 0);
        }
    }
}

static void unpack_q5_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < K / QK; b++, w += 176, o += ldo) {
        const __m256i sc16 = k_header(w, d + b, mn + 8 * b);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 16));
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 48 + 32 * j));
            const __m256i h0 = _mm256_and_si256(qh, one), h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
            qh = _mm256_srli_epi16(qh, 2);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(h0, 4));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_slli_epi16(h1, 4));
            const __m256i s0 = _mm256_shuffle_epi8(sc16, pick16(2 * j)), s1 = _mm256_shuffle_epi8(sc16, pick16(2 * j + 1));
            put16x2(o + 64 * j, q0, s0, s0, 0);
            put16x2(o + 64 * j + 32, q1, s1, s1, 0);
        }
    }
}

static void unpack_q6_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    (void)mn;
    const __m256i k32 = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < K / QK; b++, w += 210, o += ldo) {
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        d[b] = h2f(w + 208);
        for (int hf = 0; hf < 2; hf++) {
            const __m256i half = _mm256_permute2x128_si256(sc16, sc16, hf ? 0x11 : 0x00);
            __m256i q[4];
            q6_codes(w + 64 * hf, w + 128 + 32 * hf, q);
            for (int qq = 0; qq < 4; qq++)
                put16x2(o + 128 * hf + 32 * qq, _mm256_sub_epi8(q[qq], k32), _mm256_shuffle_epi8(half, pick16(2 * qq)),
                        _mm256_shuffle_epi8(half, pick16(2 * qq + 1)), 1);
        }
    }
}

/* Q2_K (q3 = 0): w16 = q * sc (codes 0..3, scales 0..15) and sixteen mins per block, mn [K / 256][16] = dmin * m;
 * Q3_K (q3 = 1): w16 = (q - 4) * (sc - 32), no mins */
static inline __attribute__((always_inline)) void unpack_q23_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo,
                                                              float *d, float *mn, const int q3) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m256i bias = _mm256_set1_epi8(q3 ? 4 : 0);
    for (int64_t b = 0; b < K / QK; b++, w += q3 ? 110 : 84, o += ldo) {
        __m256i sc16, hm = _mm256_setzero_si256();
        const uint8_t *qs;
        if (q3) {
            sc16 = _mm256_cvtepi8_epi16(q3_scales(w + 96));
            hm = _mm256_loadu_si256((const __m256i *)w);
            d[b] = h2f(w + 108);
            qs = w + 32;
        } else {
            const __m128i sm = _mm_loadu_si128((const __m128i *)w);
            const __m128i mn8 = _mm_and_si128(_mm_srli_epi16(sm, 4), m4);
            const __m256 dmin = _mm256_set1_ps(h2f(w + 82));
            _mm256_storeu_ps(mn + 16 * b, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn8))));
            _mm256_storeu_ps(mn + 16 * b + 8,
                             _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mn8, 8)))));
            sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4));
            d[b] = h2f(w + 80);
            qs = w + 16;
        }
        for (int hf = 0; hf < 2; hf++) {
            const __m256i half = _mm256_permute2x128_si256(sc16, sc16, hf ? 0x11 : 0x00);
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * hf));
            for (int j = 0; j < 4; j++)
                put16x2(o + 128 * hf + 32 * j, _mm256_sub_epi8(q23_codes(q, hm, hf, j, q3), bias),
                        _mm256_shuffle_epi8(half, pick16(2 * j)), _mm256_shuffle_epi8(half, pick16(2 * j + 1)), q3);
        }
    }
}

static void unpack_q2_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    unpack_q23_k(w, K, o, ldo, d, mn, 0);
}

static void unpack_q3_k(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    unpack_q23_k(w, K, o, ldo, d, mn, 1);
}

/* IQ4_XS: w16 = v * (ls - 32) (|w16| <= 127 * 32), no mins */
static void unpack_iq4_xs(const uint8_t *w, int64_t K, int16_t *o, int64_t ldo, float *d, float *mn) {
    (void)mn;
    for (int64_t b = 0; b < K / QK; b++, w += 136, o += ldo) {
        const __m256i sc16 = iq4_xs_scales(w);
        d[b] = h2f(w);
        for (int s = 0; s < 8; s++) {
            const __m256i sv = _mm256_shuffle_epi8(sc16, pick16(s));
            put16x2(o + 32 * s, iq4_values(w + 8 + 16 * s), sv, sv, 1);
        }
    }
}

typedef void (*unpack_fn)(const uint8_t *, int64_t, int16_t *, int64_t, float *, float *);

static unpack_fn pick_unpack(int qtype) {
    switch (qtype) {
        case QT_Q2_K: return unpack_q2_k;
        case QT_Q3_K: return unpack_q3_k;
        case QT_Q4_K: return unpack_q4_k;
        case QT_Q5_K: return unpack_q5_k;
        case QT_Q6_K: return unpack_q6_k;
        case QT_IQ4_XS: return unpack_iq4_xs;
        default: return 0;
    }
}

/* One 256-value block of IG_MR activation rows x IG_NR weight rows (rows QK int16 apart): acc[i * lda + r]
 * (float32 x 8 lanes, summed at the end) += sc[i * lda + r] * Sum(x16 * w16) - mn[r] . fs[i], with sc the
 * products of the block scales d[r] * s[i] and the mins when given (eight per block and row). */
static inline __attribute__((always_inline)) void ukernel_i16(const int16_t *x, const int16_t *w, const float *sc,
                                                              const float *xfs, int64_t ldxf, const float *wmn,
                                                              int64_t ldwm, __m256 *acc, int64_t lda, int mins) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    /* The loop in assembly: gcc keeps the eight accumulators in rotating registers and adds a register move
     * per product (measured 1.14 products per cycle against 1.54 for this loop, which is the issue-rate
     * bound: pmaddwd + paddd per 16 pairs, ~3 vector ops per cycle). Rows are QK int16 = 512 bytes apart. */
    const int16_t *xp = x, *wp = w;
#ifdef MOESERVE_VNNI
    /* VNNI: vpdpwssd (madd + add in one op, 5-cycle latency) on two sets of eight accumulators (even and odd 16-pair
     * steps; the odd set in ymm18-25, of the 32 AVX-512 registers) so that the dependency chains do not bound the
     * loop; the sets are summed after it (int32 mod 2^32, exact: the same sums as the AVX2 loop). */
    int64_t n = QK / 32;
    __asm__ volatile(
        "vpxord %%xmm18, %%xmm18, %%xmm18\n\t"
        "vpxord %%xmm19, %%xmm19, %%xmm19\n\t"
        "vpxord %%xmm20, %%xmm20, %%xmm20\n\t"
        "vpxord %%xmm21, %%xmm21, %%xmm21\n\t"
        "vpxord %%xmm22, %%xmm22, %%xmm22\n\t"
        "vpxord %%xmm23, %%xmm23, %%xmm23\n\t"
        "vpxord %%xmm24, %%xmm24, %%xmm24\n\t"
        "vpxord %%xmm25, %%xmm25, %%xmm25\n\t"
        "1:\n\t"
        "vmovdqu (%[w]), %%ymm12\n\t"
        "vmovdqu 512(%[w]), %%ymm13\n\t"
        "vmovdqu 32(%[w]), %%ymm14\n\t"
        "vmovdqu 544(%[w]), %%ymm15\n\t"
        "vmovdqu64 (%[x]), %%ymm16\n\t"
        "vmovdqu64 32(%[x]), %%ymm17\n\t"
        "vpdpwssd %%ymm16, %%ymm12, %[a00]\n\t"
        "vpdpwssd %%ymm16, %%ymm13, %[a01]\n\t"
        "vpdpwssd %%ymm17, %%ymm14, %%ymm18\n\t"
        "vpdpwssd %%ymm17, %%ymm15, %%ymm19\n\t"
        "vmovdqu64 512(%[x]), %%ymm16\n\t"
        "vmovdqu64 544(%[x]), %%ymm17\n\t"
        "vpdpwssd %%ymm16, %%ymm12, %[a10]\n\t"
        "vpdpwssd %%ymm16, %%ymm13, %[a11]\n\t"
        "vpdpwssd %%ymm17, %%ymm14, %%ymm20\n\t"
        "vpdpwssd %%ymm17, %%ymm15, %%ymm21\n\t"
        "vmovdqu64 1024(%[x]), %%ymm16\n\t"
        "vmovdqu64 1056(%[x]), %%ymm17\n\t"
        "vpdpwssd %%ymm16, %%ymm12, %[a20]\n\t"
        "vpdpwssd %%ymm16, %%ymm13, %[a21]\n\t"
        "vpdpwssd %%ymm17, %%ymm14, %%ymm22\n\t"
        "vpdpwssd %%ymm17, %%ymm15, %%ymm23\n\t"
        "vmovdqu64 1536(%[x]), %%ymm16\n\t"
        "vmovdqu64 1568(%[x]), %%ymm17\n\t"
        "vpdpwssd %%ymm16, %%ymm12, %[a30]\n\t"
        "vpdpwssd %%ymm16, %%ymm13, %[a31]\n\t"
        "vpdpwssd %%ymm17, %%ymm14, %%ymm24\n\t"
        "vpdpwssd %%ymm17, %%ymm15, %%ymm25\n\t"
        "add $64, %[x]\n\t"
        "add $64, %[w]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vpaddd %%ymm18, %[a00], %[a00]\n\t"
        "vpaddd %%ymm19, %[a01], %[a01]\n\t"
        "vpaddd %%ymm20, %[a10], %[a10]\n\t"
        "vpaddd %%ymm21, %[a11], %[a11]\n\t"
        "vpaddd %%ymm22, %[a20], %[a20]\n\t"
        "vpaddd %%ymm23, %[a21], %[a21]\n\t"
        "vpaddd %%ymm24, %[a30], %[a30]\n\t"
        "vpaddd %%ymm25, %[a31], %[a31]\n\t"
        : [a00] "+v"(a00), [a01] "+v"(a01), [a10] "+v"(a10), [a11] "+v"(a11), [a20] "+v"(a20), [a21] "+v"(a21),
          [a30] "+v"(a30), [a31] "+v"(a31), [x] "+r"(xp), [w] "+r"(wp), [n] "+r"(n)
        :
        : "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24",
          "xmm25", "memory", "cc");
#else
    int64_t n = QK / 16;
    __asm__ volatile(
        "1:\n\t"
        "vmovdqu (%[w]), %%ymm12\n\t"
        "vmovdqu 512(%[w]), %%ymm13\n\t"
        "vmovdqu (%[x]), %%ymm14\n\t"
        "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"
        "vpaddd %%ymm15, %[a00], %[a00]\n\t"
        "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\t"
        "vpaddd %%ymm14, %[a01], %[a01]\n\t"
        "vmovdqu 512(%[x]), %%ymm14\n\t"
        "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"
        "vpaddd %%ymm15, %[a10], %[a10]\n\t"
        "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\t"
        "vpaddd %%ymm14, %[a11], %[a11]\n\t"
        "vmovdqu 1024(%[x]), %%ymm14\n\t"
        "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"
        "vpaddd %%ymm15, %[a20], %[a20]\n\t"
        "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\t"
        "vpaddd %%ymm14, %[a21], %[a21]\n\t"
        "vmovdqu 1536(%[x]), %%ymm14\n\t"
        "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"
        "vpaddd %%ymm15, %[a30], %[a30]\n\t"
        "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\t"
        "vpaddd %%ymm14, %[a31], %[a31]\n\t"
        "add $32, %[x]\n\t"
        "add $32, %[w]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11), [a20] "+x"(a20), [a21] "+x"(a21),
          [a30] "+x"(a30), [a31] "+x"(a31), [x] "+r"(xp), [w] "+r"(wp), [n] "+r"(n)
        :
        : "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
#endif
    const __m256i a[IG_MR][IG_NR] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int i = 0; i < IG_MR; i++)
        for (int r = 0; r < IG_NR; r++) {
            __m256 *o = acc + i * lda + r;
            __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i][r]), _mm256_broadcast_ss(sc + i * lda + r), *o);
            for (int v = 0; v < mins; v++) /* 8 mins per block (Q4_K/Q5_K), or 16 (Q2_K) */
                f = _mm256_fnmadd_ps(_mm256_loadu_ps(xfs + i * ldxf + 8 * v), _mm256_loadu_ps(wmn + r * ldwm + 8 * v), f);
            *o = f;
        }
}

static __thread void *ig_tile = 0;
static __thread int64_t ig_tile_bytes = 0;
static __thread void *ig_x = 0;
static __thread int64_t ig_x_bytes = 0;

/* y[m, N] = x[m, K] @ W.T for a K-quant W (see the section comment). Returns 0, or -1 for an unsupported
 * type / shape or allocation failure. */
int mk_gemm_i16(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
                float *y, int nthreads) {
    unpack_fn unpack = pick_unpack(qtype);
    if (!unpack || K % QK || m <= 0) return -1;
    if (m > IG_MMAX) { /* chunks of IG_MMAX rows: each chunk's x16 (64 x 4 KB at K = 2048) stays in L2 across the
                        * tiles, instead of streaming all of x from memory once per tile (prefill) */
        for (int64_t i = 0; i < m; i += IG_MMAX)
            if (mk_gemm_i16(qtype, w, row_bytes, N, K, x + i * K, m - i < IG_MMAX ? m - i : IG_MMAX, y + i * N, nthreads))
                return -1;
        return 0;
    }
    /* min vectors of 8 per block: Q6_K/Q3_K/IQ4_XS have none (their offsets are in the int16 codes), Q2_K two (a min per
     * 16 values, against the activation's per-16 sums), Q4_K/Q5_K one (per 32) */
    const int mins = qtype == QT_Q6_K || qtype == QT_Q3_K || qtype == QT_IQ4_XS ? 0 : qtype == QT_Q2_K ? 2 : 1;
    const int64_t nm = 8 * mins, fg = qtype == QT_Q2_K ? 16 : 32, ldf = K / fg; /* mins per block, sums per row */
    const int64_t nb = K / QK, mp = (m + IG_MR - 1) / IG_MR * IG_MR, ntile = (N + IG_NT - 1) / IG_NT;
    /* quantized activations, block-major (x16[b][i][256]), padded with zero rows to a multiple of IG_MR */
    char *xb = (char *)grow_bytes(&ig_x, &ig_x_bytes, mp * (2 * K + 4 * nb + 4 * ldf));
    if (!xb) return -1;
    int16_t *x16 = (int16_t *)xb;
    float *xs = (float *)(x16 + mp * K), *xfs = xs + mp * nb;
    int failed = 0;
    const int par = nthreads > 1 && N * K * m >= PAR_MIN;
#pragma omp parallel num_threads(nthreads) if (par)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < mp; i++) {
            if (i < m) {
                quant_row_i16(x + i * K, K, x16 + i * QK, mp * QK, xs + i * nb, xfs + i * ldf, (int)fg);
            } else {
                for (int64_t b = 0; b < nb; b++) memset(x16 + (b * mp + i) * QK, 0, 2 * QK);
                memset(xs + i * nb, 0, 4 * nb);
                memset(xfs + i * ldf, 0, 4 * ldf);
            }
        }
        /* per thread: the chunk's accumulators and the decoded tile (block-major int16 rows, scales, mins) */
        char *tb = (char *)grow_bytes(&ig_tile, &ig_tile_bytes, 32 * IG_MC * IG_NT + IG_NT * (2 * K + 68 * nb));
        if (!tb) {
#pragma omp atomic write
            failed = 1;
        }
        const int nth = omp_get_num_threads();
#pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < ntile; t++) {
            if (!tb) continue;
            /* this thread's next tile (static cyclic schedule) is prefetched while this one is multiplied:
             * decoding reads the weights once, in bursts, which the hardware prefetcher does not run ahead of
             * (measured: a third of the decode time waited on DRAM) */
            const int64_t tn = t + nth, nn0 = tn * IG_NT;
            const char *pf_next = (const char *)(w + nn0 * row_bytes);
            const char *pf_end = pf_next + (tn < ntile ? (N - nn0 < IG_NT ? N - nn0 : IG_NT) * row_bytes : 0);
            __m256 *acc = (__m256 *)tb; /* [IG_MC][IG_NT] */
            int16_t *wt = (int16_t *)(tb + 32 * IG_MC * IG_NT); /* [nb][IG_NT][256] */
            float *wd = (float *)(wt + IG_NT * K), *wmn = wd + IG_NT * nb; /* [IG_NT][nb], [IG_NT][nb][nm] */
            const int64_t n0 = t * IG_NT, rows = N - n0 < IG_NT ? N - n0 : IG_NT;
            for (int64_t r = 0; r < rows; r++)
                unpack(w + (n0 + r) * row_bytes, K, wt + r * QK, IG_NT * QK, wd + r * nb, wmn + r * nm * nb);
            const int64_t rp = (rows + IG_NR - 1) / IG_NR * IG_NR;
            float wdb[IG_NT * (K / QK)]; /* the block scales again, block-major: [nb][IG_NT] (zero past rows) */
            for (int64_t b = 0; b < nb; b++)
                for (int64_t r = 0; r < IG_NT; r++) wdb[b * IG_NT + r] = r < rows ? wd[r * nb + b] : 0.0f;
            const int64_t pf_step = ((pf_end - pf_next) / (nb * rp / IG_NR) + 63) / 64 * 64;
            for (int64_t r = rows; r < rp; r++) {
                for (int64_t b = 0; b < nb; b++) memset(wt + (b * IG_NT + r) * QK, 0, 2 * QK);
                memset(wd + r * nb, 0, 4 * nb);
                memset(wmn + r * nm * nb, 0, 4 * nm * nb);
            }
            for (int64_t c0 = 0; c0 < mp; c0 += IG_MC) {
                const int64_t cm = mp - c0 < IG_MC ? mp - c0 : IG_MC;
                for (int64_t j = 0; j < cm * IG_NT; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t b = 0; b < nb; b++) {
                    float sc[IG_MC * IG_NT] __attribute__((aligned(32))); /* d[r] * s[i] for this block: one
                                                                                * broadcast per accumulator */
                    for (int64_t i = 0; i < cm; i++) {
                        const __m256 si = _mm256_set1_ps(xs[(c0 + i) * nb + b]);
                        for (int64_t r = 0; r < IG_NT; r += 8)
                            _mm256_store_ps(sc + i * IG_NT + r, _mm256_mul_ps(si, _mm256_loadu_ps(wdb + b * IG_NT + r)));
                    }
                    for (int64_t r = 0; r < rp; r += IG_NR) {
                        if (c0 == 0) /* pf_step bytes of the next tile per (block, row pair) */
                            for (int64_t o = 0; o < pf_step && pf_next < pf_end; o += 64, pf_next += 64)
                                _mm_prefetch(pf_next, _MM_HINT_T1);
                        for (int64_t i = 0; i < cm; i += IG_MR) {
                            const int64_t ii = c0 + i;
                            const int16_t *xq = x16 + (b * mp + ii) * QK, *wq = wt + (b * IG_NT + r) * QK;
                            if (mins == 1)
                                ukernel_i16(xq, wq, sc + i * IG_NT + r, xfs + ii * ldf + nm * b, ldf,
                                            wmn + r * nm * nb + nm * b, nm * nb, acc + i * IG_NT + r, IG_NT, 1);
                            else if (mins == 2)
                                ukernel_i16(xq, wq, sc + i * IG_NT + r, xfs + ii * ldf + nm * b, ldf,
                                            wmn + r * nm * nb + nm * b, nm * nb, acc + i * IG_NT + r, IG_NT, 2);
                            else
                                ukernel_i16(xq, wq, sc + i * IG_NT + r, 0, 0, 0, 0, acc + i * IG_NT + r, IG_NT, 0);
                        }
                    }
                }
                for (int64_t i = 0; i < cm && c0 + i < m; i++)
                    for (int64_t r = 0; r < rows; r++) y[(c0 + i) * N + n0 + r] = hsum8(acc[i * IG_NT + r]);
            }
        }
    }
    return failed ? -1 : 0;
}

/* y[m, N] = x[m, K] @ W.T, W = N rows of `row_bytes` GGUF bytes, K % 256 == 0: the integer GEMM for the types it
 * decodes (the K-quants), else the exact float32 one. Returns 0, or -1 for an unsupported type / allocation failure. */
int mk_gemm(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
            float *y, int nthreads) {
    return pick_unpack(qtype) ? mk_gemm_i16(qtype, w, row_bytes, N, K, x, m, y, nthreads)
                              : mk_gemm_f32(qtype, w, row_bytes, N, K, x, m, y, nthreads);
}
