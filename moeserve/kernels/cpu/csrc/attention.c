#include "common.h"

/* ---------------------------------------------------------------------------------------
 * decode attention: one new query per sequence against that sequence's cached keys
 *
 * q [B, nh, hd], k/v [B, Lmax, nkv, hd] (row j of sequence b at (b * Lmax + j) * nkv * hd), lens[b]
 * keys used by sequence b. Paged (block > 0): k/v are slot pools [slots, nkv, hd] and row j of
 * sequence b is slot table[b * tstride + j / block] * block + j % block (checked against the pool's nslots
 * rows), so a decode step reads the paged KV cache in place (no gather copy per layer); Lmax then only
 * bounds lens (the last `window` of them with a sliding window). Query head h reads KV
 * head h / (nh / nkv). Work items are (sequence, KV head) pairs; each computes the scores of its
 * query heads, a max-subtracted softmax with a vectorised exp, and the weighted sums of values.
 *
 * Why: torch's CPU SDPA (and bmm + softmax) takes ~350 us per layer for one query over 600 keys
 * on this machine (~14 GMAC/s), ~10x the arithmetic; at full size that was 17 ms of each token.
 * ------------------------------------------------------------------------------------- */

/* e^x for x <= 0 (softmax arguments): Cephes' expf polynomial, relative error ~1e-7 */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* (a NaN x is returned as is: NaN scores propagate) */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define ATT_HD_MAX 256 /* head_dim limit of mk_attn_decode (callers fall back beyond) */
#define ATT_TILE 8 /* value rows per P.V tile: rows are 2 KB apart at 4 KV heads, so more rows per tile
                       * fall into the same L1 set (8 ways) and evict each other (measured: 32 rows 490 us, 8 rows 410) */
static __thread void *attn_scores = 0;
static __thread int64_t attn_scores_bytes = 0;

int mk_attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t Lmax, const int64_t *lens,
                   int64_t nh, int64_t nkv, int64_t hd, float scale, int64_t window, const int64_t *table,
                   int64_t tstride, int64_t block, int64_t nslots, float *out, int nthreads) {
    if (hd % 8 || hd > ATT_HD_MAX || nh % nkv || B <= 0 || (block > 0 && !table)) return -1;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > Lmax) return -1;
        if (block > 0) /* every block a sequence reads must lie inside the pool's nslots rows */
            for (int64_t i = 0; i < (lens[b] + block - 1) / block; i++)
                if (table[b * tstride + i] < 0 || table[b * tstride + i] >= nslots / block) return -1;
    }
    const int64_t g = nh / nkv, rs = nkv * hd;
    int failed = 0;
    int par = nthreads > 1 && B * nh * Lmax * hd >= (1 << 15);
#pragma omp parallel num_threads(nthreads) if (par)
    {
        float *scores = (float *)grow_bytes(&attn_scores, &attn_scores_bytes, 4 * 8 * Lmax);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
        /* one item = one sequence's KV head and (up to 8 of) the g query heads that read it: each key
         * and value row comes from memory once and from L1/L2 for the other heads. Scores are laid
         * out [key][8 heads], so one key row is dotted with 8 heads at once (8 accumulators, one
         * transpose-reduce per row) and the softmax runs across the 8 heads in the vector lanes. */
        const int64_t ng = (g + 7) / 8;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < B * nkv * ng; it++) {
            if (!scores) continue;
            const int64_t b = it / (nkv * ng), kvh = (it / ng) % nkv, h0 = kvh * g + (it % ng) * 8, L = lens[b];
            const int64_t G = g - (h0 - kvh * g) < 8 ? g - (h0 - kvh * g) : 8;
            const int64_t j0 = window > 0 && L > window ? L - window : 0, n = L - j0;
            const float *kb = k + kvh * hd, *vb = v + kvh * hd; /* + row(j) * rs */
            const int64_t *tb = block > 0 ? table + b * tstride : 0;
#define ATT_ROW(j) (tb ? tb[(j) / block] * block + (j) % block : b * Lmax + (j))
            /* the group's queries at a fixed stride (one base register for all 8; extra lanes repeat head 0) */
            float qg[8][ATT_HD_MAX];
            for (int64_t hh = 0; hh < 8; hh++) memcpy(qg[hh], q + (b * nh + h0 + (hh < G ? hh : 0)) * hd, hd * sizeof(float));
            const __m256 vscale = _mm256_set1_ps(scale);
            __m256 vmax = _mm256_set1_ps(-INFINITY);
            for (int64_t j = 0; j < n; j++) {
                const float *kr = kb + ATT_ROW(j0 + j) * rs;
                __m256 a[8];
                for (int hh = 0; hh < 8; hh++) a[hh] = _mm256_setzero_ps();
                for (int64_t d = 0; d < hd; d += 8) {
                    const __m256 kv = _mm256_loadu_ps(kr + d);
                    for (int hh = 0; hh < 8; hh++) a[hh] = _mm256_fmadd_ps(_mm256_loadu_ps(qg[hh] + d), kv, a[hh]);
                }
                /* transpose-reduce: lane hh = sum of a[hh] */
                __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
                __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
                __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
                __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
                r = _mm256_mul_ps(r, vscale);
                vmax = _mm256_max_ps(vmax, r);
                _mm256_storeu_ps(scores + 8 * j, r);
            }
            __m256 vsum = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + 8 * j), vmax));
                _mm256_storeu_ps(scores + 8 * j, e);
                vsum = _mm256_add_ps(vsum, e);
            }
            float inv[8];
            _mm256_storeu_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), vsum));
            /* P V in tiles of ATT_TILE value rows: each tile comes from L2/L3 once and from L1 for every
             * head and 64-dim pass (untiled, the 16 passes re-read all the values from L3). */
            float *ob = out + (b * nh + h0) * hd;
            memset(ob, 0, G * hd * sizeof(float));
            for (int64_t t0 = 0; t0 < n; t0 += ATT_TILE) {
                const int64_t t1 = t0 + ATT_TILE < n ? t0 + ATT_TILE : n;
                const float *vrow[ATT_TILE];
                for (int64_t jj = t0; jj < t1; jj++) vrow[jj - t0] = vb + ATT_ROW(j0 + jj) * rs;
                for (int64_t hh = 0; hh < G; hh++) {
                    float *o = ob + hh * hd;
                    int64_t d0 = 0;
                    /* 8 accumulators (a compile-time count, so they stay in registers): 64 dims per pass */
                    for (; d0 + 64 <= hd; d0 += 64) {
                        __m256 acc[8];
                        for (int i = 0; i < 8; i++) acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
                        for (int64_t jj = t0; jj < t1; jj++) {
                            const __m256 pj = _mm256_broadcast_ss(scores + 8 * jj + hh);
                            const float *vr = vrow[jj - t0] + d0;
                            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * i), acc[i]);
                        }
                        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
                    }
                    for (; d0 < hd; d0 += 8) { /* head_dim not a multiple of 64: the rest, 8 dims per pass */
                        __m256 acc = _mm256_loadu_ps(o + d0);
                        for (int64_t jj = t0; jj < t1; jj++)
                            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + 8 * jj + hh), _mm256_loadu_ps(vrow[jj - t0] + d0), acc);
                        _mm256_storeu_ps(o + d0, acc);
                    }
                }
            }
            for (int64_t hh = 0; hh < G; hh++) {
                const __m256 vinv = _mm256_set1_ps(inv[hh]);
                for (int64_t d = 0; d < hd; d += 8)
                    _mm256_storeu_ps(ob + hh * hd + d, _mm256_mul_ps(_mm256_loadu_ps(ob + hh * hd + d), vinv));
            }
        }
    }
    return failed ? -1 : 0;
#undef ATT_ROW
}
