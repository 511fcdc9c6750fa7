#include "common.h"

/* ---------------------------------------------------------------------------------------
 * fused MoE for a few tokens (decode): one call per layer
 *
 *   out[t] = Sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]
 *
 * Same integer dot products as mk_matmul (m < GEMM_MIN_ROWS), up to 4 of an expert's tokens per pass over a
 * row (`dot_multi`). Each token's activation is quantized once and reused by all its experts; each hidden activation a = silu(g) * u is quantized per 256 values
 * exactly as mk_matmul would quantize the `down` input. The (token, slot) pairs are grouped by
 * expert (counting sort), so an expert chosen by several tokens reads each weight row once and
 * dots it with all of their activations while it is in L1.
 *
 * Threads: one parallel region with two work-shared phases and a single barrier between them:
 *   A. items (expert group, 256-row block of I): gate and up rows -> a = silu(g) * u for the
 *      group's pairs -> quantized in place (a 256-block is one activation scale block), so the
 *      down input is ready with no extra pass;
 *   B. items (chunk of output rows h): down rows of every group, then out[t, h] = Sum_j w y
 *      for the chunk (each h is owned by one thread: no atomics, deterministic order).
 * Dynamic scheduling: on a loaded machine a thread that got the CPU keeps taking items.
 *
 * mk_moe_routed also routes, in the same region: float32 router logits (rows shared out among
 * the threads), then softmax / top-k / renormalisation and the grouping on one thread, then A, B.
 * ------------------------------------------------------------------------------------- */

#define MOE_DOWN_ROWS 256 /* down rows of one expert per phase-B item */

static __thread void *moe_scratch = 0;
static __thread int64_t moe_scratch_bytes = 0;

static inline float silu_f(float v) { return v / (1.0f + expf(-v)); }

static void xq_bind(xq_t *q, int8_t *hi, int8_t *lo, float *s, int32_t *bsum, float *fb) {
    q->hi = hi;
    q->lo = lo;
    q->s = s;
    q->bsum = bsum;
    q->fb = fb;
}

static float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    float r = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* softmax over E logits, top-k (ties: lower index first), optional renormalisation */
static void route_topk(const float *l, int64_t E, int64_t k, int renorm, float *w, int64_t *ids) {
    float bv[k];
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        float v = l[e];
        if (n == k && !(v > bv[k - 1])) continue; /* (also skips NaN) */
        int64_t j = n < k ? n++ : k - 1;
        while (j > 0 && v > bv[j - 1]) {
            bv[j] = bv[j - 1];
            ids[j] = ids[j - 1];
            j--;
        }
        bv[j] = v;
        ids[j] = e;
    }
    for (int64_t j = n; j < k; j++) { /* fewer than k finite logits: pad with expert 0, weight 0 */
        bv[j] = -INFINITY;
        ids[j] = 0;
    }
    float mx = bv[0], sum = 0.0f;
    if (renorm)
        for (int64_t j = 0; j < k; j++) sum += expf(bv[j] - mx);
    else
        for (int64_t e = 0; e < E; e++) sum += expf(l[e] - mx);
    for (int64_t j = 0; j < k; j++) w[j] = expf(bv[j] - mx) / sum;
}

/* counting sort of the P pairs by expert: returns the number of groups U */
static int64_t moe_group(const int64_t *ids, int64_t P, int64_t E, int64_t *order, int64_t *gexp, int64_t *gstart,
                         int64_t *count) {
    memset(count, 0, (E + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) count[ids[p] + 1]++;
    int64_t U = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e + 1]) {
            gexp[U] = e;
            gstart[U++] = count[e];
        }
        count[e + 1] += count[e];
    }
    gstart[U] = P;
    for (int64_t p = 0; p < P; p++) order[count[ids[p]]++] = p;
    return U;
}

static int moe_run(const mk_moe_t *L, int64_t T, int64_t k, const float *x, float *w, int64_t *ids, float *out,
                   int nthreads, int route) {
    dot_fn dg = pick_dot(L->qtype[0]), du = pick_dot(L->qtype[1]), dd = pick_dot(L->qtype[2]);
    const int64_t H = L->H, I = L->I, E = L->n_experts, P = T * k;
    if (!dg || !du || !dd || H % QK || I % QK || T <= 0 || k <= 0 || k > E || (route && !L->router)) return -1;
    if (!route)
        for (int64_t p = 0; p < P; p++)
            if (ids[p] < 0 || ids[p] >= E) return -2;
    /* scratch: down outputs, quantized token and hidden activations, grouping, router logits */
    const int64_t xq_bytes = 2 * H + 4 * (H / QK) + 4 * (H / 16) + 4 * (H / 32),
                  aq_bytes = 2 * I + 4 * (I / QK) + 4 * (I / 16) + 4 * (I / 32);
    int64_t need = 4 * P * H + (T + P) * (int64_t)sizeof(xq_t) + 8 * (3 * P + E + 2) + T * xq_bytes + P * aq_bytes +
                   4 * T * E + 256;
    if (need > moe_scratch_bytes) {
        free(moe_scratch);
        moe_scratch = malloc(need);
        moe_scratch_bytes = moe_scratch ? need : 0;
        if (!moe_scratch) return -1;
    }
    char *sp = (char *)moe_scratch;
    float *y = (float *)sp; /* [P, H] down outputs */
    sp += 4 * P * H;
    xq_t *xq = (xq_t *)sp, *aq = xq + T;
    sp += (T + P) * sizeof(xq_t);
    int64_t *order = (int64_t *)sp; /* [P] pairs sorted by expert (stable) */
    int64_t *gexp = order + P;     /* [U] expert of group u */
    int64_t *gstart = gexp + P;    /* [U + 1] group u = order[gstart[u] .. gstart[u + 1]] */
    int64_t *count = gstart + P + 1; /* [E + 1] */
    sp = (char *)(count + E + 1);
    float *xs = (float *)sp;
    int32_t *xb = (int32_t *)(xs + T * (H / QK));
    float *xf = (float *)(xb + T * (H / 16));
    int8_t *xh = (int8_t *)(xf + T * (H / 32)), *xl = xh + T * H;
    float *as = (float *)(xl + T * H);
    int32_t *ab = (int32_t *)(as + P * (I / QK));
    float *af = (float *)(ab + P * (I / 16));
    int8_t *ah = (int8_t *)(af + P * (I / 32)), *al = ah + P * I;
    float *logits = (float *)(al + P * I); /* [T, E] */
    for (int64_t t = 0; t < T; t++) {
        xq_bind(&xq[t], xh + t * H, xl + t * H, xs + t * (H / QK), xb + t * (H / 16), xf + t * (H / 32));
        quant_row(x + t * H, H, xq[t]);
    }
    for (int64_t p = 0; p < P; p++)
        xq_bind(&aq[p], ah + p * I, al + p * I, as + p * (I / QK), ab + p * (I / 16), af + p * (I / 32));
    int64_t U = route ? 0 : moe_group(ids, P, E, order, gexp, gstart, count);

    const int64_t nblk = I / QK, nchunk = (H + MOE_DOWN_ROWS - 1) / MOE_DOWN_ROWS;
    const uint8_t *gb = L->base[0], *ub = L->base[1], *db = L->base[2];
    const int64_t gs = L->expert_stride[0], us = L->expert_stride[1], ds = L->expert_stride[2];
    const int64_t grb = L->row_bytes[0], urb = L->row_bytes[1], drb = L->row_bytes[2];
    int par = nthreads > 1 && (P < E ? P : E) * 3 * I * H >= PAR_MIN;
#pragma omp parallel num_threads(nthreads) if (par)
    {
        if (route) {
#pragma omp for schedule(static)
            for (int64_t e = 0; e < E; e++)
                for (int64_t t = 0; t < T; t++) logits[t * E + e] = dot_f32(L->router + e * H, x + t * H, H);
#pragma omp single
            {
                for (int64_t t = 0; t < T; t++) route_topk(logits + t * E, E, k, (int)L->renormalize, w + t * k, ids + t * k);
                U = moe_group(ids, P, E, order, gexp, gstart, count);
            } /* implicit barrier: routing and grouping visible to all threads */
        }
        float a[4][QK];
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < U * nblk; it++) {
            const int64_t u = it / nblk, b = it % nblk, e = gexp[u];
            const uint8_t *g0 = gb + e * gs + b * QK * grb, *u0 = ub + e * us + b * QK * urb;
            for (int64_t r0 = gstart[u]; r0 < gstart[u + 1]; r0 += 4) { /* up to 4 pairs per pass over the rows */
                const int64_t cnt = gstart[u + 1] - r0 < 4 ? gstart[u + 1] - r0 : 4;
                const xq_t *xt[4];
                for (int64_t i = 0; i < cnt; i++) xt[i] = &xq[order[r0 + i] / k];
                for (int n = 0; n < QK; n++) {
                    float g[4], v[4];
                    if (!dot_multi(L->qtype[0], g0 + n * grb, H, xt, cnt, g))
                        for (int64_t i = 0; i < cnt; i++) g[i] = dg(g0 + n * grb, H, xt[i]);
                    if (!dot_multi(L->qtype[1], u0 + n * urb, H, xt, cnt, v))
                        for (int64_t i = 0; i < cnt; i++) v[i] = du(u0 + n * urb, H, xt[i]);
                    for (int64_t i = 0; i < cnt; i++) a[i][n] = silu_f(g[i]) * v[i];
                }
                for (int64_t i = 0; i < cnt; i++) {
                    const int64_t p = order[r0 + i];
                    xq_t blk;
                    xq_bind(&blk, aq[p].hi + b * QK, aq[p].lo + b * QK, aq[p].s + b, aq[p].bsum + b * (QK / 16),
                            aq[p].fb + b * (QK / 32));
                    quant_row(a[i], QK, blk);
                }
            }
        }
        /* implicit barrier: every pair's hidden activation is complete and quantized */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < U * nchunk; it++) {
            /* one expert's contiguous run of MOE_DOWN_ROWS down rows: long sequential reads */
            const int64_t u = it / nchunk, h0 = (it % nchunk) * MOE_DOWN_ROWS;
            const int64_t h1 = h0 + MOE_DOWN_ROWS < H ? h0 + MOE_DOWN_ROWS : H;
            const uint8_t *d0 = db + gexp[u] * ds;
            for (int64_t h = h0; h < h1; h++)
                for (int64_t r0 = gstart[u]; r0 < gstart[u + 1]; r0 += 4) {
                    const int64_t cnt = gstart[u + 1] - r0 < 4 ? gstart[u + 1] - r0 : 4;
                    const xq_t *ap[4];
                    float o[4];
                    for (int64_t i = 0; i < cnt; i++) ap[i] = &aq[order[r0 + i]];
                    if (!dot_multi(L->qtype[2], d0 + h * drb, I, ap, cnt, o))
                        for (int64_t i = 0; i < cnt; i++) o[i] = dd(d0 + h * drb, I, ap[i]);
                    for (int64_t i = 0; i < cnt; i++) y[order[r0 + i] * H + h] = o[i];
                }
        }
        /* implicit barrier: all down outputs are in y */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                float s = 0.0f;
                for (int64_t j = 0; j < k; j++) s += w[t * k + j] * y[(t * k + j) * H + h];
                out[t * H + h] = s;
            }
    }
    return 0;
}

/* out[T, H] for given routing (weights w, expert ids [T, k]). Returns 0, -1 (unsupported type /
 * shape, allocation failure) or -2 (expert id out of range). */
int mk_moe(const mk_moe_t *L, int64_t T, int64_t k, const float *x, const float *w, const int64_t *ids, float *out,
           int nthreads) {
    return moe_run(L, T, k, x, (float *)w, (int64_t *)ids, out, nthreads, 0); /* (w, ids only read) */
}

/* Routes too (L->router): writes the top-k weights w and expert ids [T, k], and out[T, H]. */
int mk_moe_routed(const mk_moe_t *L, int64_t T, int64_t k, const float *x, float *w, int64_t *ids, float *out,
                  int nthreads) {
    return moe_run(L, T, k, x, w, ids, out, nthreads, 1);
}
