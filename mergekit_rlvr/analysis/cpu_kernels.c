/* The per-chunk work of `mergekit-rlvr analyze` on CPU: one loop per chunk and pass
 * (cpu_kernels.py drives it; kernels.py holds the torch kernels with the same
 * semantics). Inputs are read as stored (bf16, f16 or f32) and widened to float32
 * exactly as torch does; Delta = model32 - base32 in float32; every compare is the
 * float32 compare of the torch kernels (epsilon and eta rounded to float32 as torch
 * rounds a Python scalar), histograms are incremented in place and sums accumulate
 * in double. A call handles blocks [first, last) of BLOCK entries of the chunk with
 * the outputs of one thread (`t`): per-thread histograms and sums, merged by the
 * caller. Built with -ffp-contract=off and no fast-math (mergekit_rlvr/native.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

/* Opposite signs where both are updated: the sign bits differ. kernels._opposite tests
 * product < 0 for epsilon >= 1e-18, the same there: both |Delta| > 1e-18 makes the
 * product a non-zero float32 whose sign is the XOR of the signs. */
static uint32_t opposite(float x, float y) { return (bits_of(x) ^ bits_of(y)) >> 31; }

/* The histogram key of each |Delta|: its coarse bin, or in a refined bin (table >= 0)
 * COARSE_BINS + the bin's first fine slot + the low 16 bits. Delta = 0 (the unchanged
 * entries, most of a sparse update) counts into 8 rotating spare counters after the
 * histogram instead (folded into its key by fold_spare): increments of one counter wait
 * on each other. */
#ifdef __AVX2__
static int keys_avx2(const float *d, const int32_t *table, int32_t spare, int n, int32_t *keys) {
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), low = _mm256_set1_epi32(0xFFFF);
    const __m256i fine = _mm256_set1_epi32(COARSE_BINS), zero = _mm256_setzero_si256();
    const __m256i spares = _mm256_add_epi32(_mm256_set1_epi32(spare), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i bits = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(d + i)), magnitude);
        __m256i coarse = _mm256_srli_epi32(bits, 16);
        __m256i offset = _mm256_i32gather_epi32(table, coarse, 4);
        __m256i refined = _mm256_cmpgt_epi32(offset, _mm256_set1_epi32(-1));
        __m256i key = _mm256_add_epi32(_mm256_add_epi32(fine, offset), _mm256_and_si256(bits, low));
        key = _mm256_blendv_epi8(coarse, key, refined);
        key = _mm256_blendv_epi8(key, spares, _mm256_cmpeq_epi32(bits, zero)); /* i is a multiple of 8 */
        _mm256_storeu_si256((__m256i *)(keys + i), key);
    }
    return i;
}
#endif

static void fold_spare(const an_args *a, int t) {
    for (int k = 0; k < a->nm; k++) {
        int64_t *hist = a->hists[t * a->nm + k], *spare = hist + a->sizes[k];
        int32_t zero_offset = a->tables[k][0];
        for (int l = 0; l < 8; l++) {
            hist[zero_offset < 0 ? 0 : COARSE_BINS + (int64_t)zero_offset] += spare[l];
            spare[l] = 0;
        }
    }
}

/* pass 1, one model: sum of squares, #updated, #changed, the |Delta| histogram */
static void pass1_model(const an_args *a, int k, int n, scratch *s, int64_t *hist, int64_t *ints, double *sums) {
    const float *m = s->m + (size_t)k * BLOCK, *d = s->d + (size_t)k * BLOCK;
    uint8_t *up = s->up + (size_t)k * BLOCK, *ch = s->ch + (size_t)k * BLOCK;
    const int32_t *table = a->tables[k];
    const float epsilon = a->epsilon, eta = a->eta;
    int32_t nu = 0, nc = 0;
    for (int i = 0; i < (n + 3) / 4 * 4; i++) { /* the zeros past n: not updated, not changed */
        float mag = fabsf(d[i]), mb = fabsf(m[i]), bb = fabsf(s->b[i]);
        float big = mb < bb ? bb : mb;
        up[i] = mag > epsilon;
        ch[i] = mag > big * eta;
        nu += up[i];
        nc += ch[i];
    }
    v4d sq[2] = {{0}}; /* two chains: an add waits on the one before in its chain only */
    for (int i = 0; i < n; i += 4) { /* entries past n are zeros (deltas) */
        v4f v;
        memcpy(&v, d + i, sizeof v);
        v4d w = __builtin_convertvector(v, v4d);
        sq[(i >> 2) & 1] += w * w;
    }
    int32_t *keys = (int32_t *)s->m + (size_t)k * BLOCK; /* model32 is used up */
    const int32_t spare = (int32_t)a->sizes[k];
    int i = 0;
#ifdef __AVX2__
    i = keys_avx2(d, table, spare, n, keys);
#endif
    for (; i < n; i++) {
        uint32_t bits = bits_of(fabsf(d[i])), coarse = bits >> 16;
        int32_t offset = table[coarse];
        int32_t key = offset < 0 ? (int32_t)coarse : COARSE_BINS + offset + (int32_t)(bits & 0xFFFFu);
        keys[i] = bits ? key : spare + (i & 7);
    }
    for (i = 0; i < n; i++) hist[keys[i]]++;
    ints[2 * k] += nu;
    ints[2 * k + 1] += nc;
    sums[k] += lanes(sq[0]) + lanes(sq[1]);
}

/* pass 1, one pair: #co-updated, #conflicts, #changed in both; dot, ||min(product, 0)||^2,
 * and over the entries changed in both: dot, ||a||^2, ||b||^2 */
static void pass1_pair(int i, int j, int n, scratch *s, int64_t *ints, double *sums) {
    const float *x = s->d + (size_t)i * BLOCK, *y = s->d + (size_t)j * BLOCK;
    const uint8_t *ui = s->up + (size_t)i * BLOCK, *uj = s->up + (size_t)j * BLOCK;
    const uint8_t *ci = s->ch + (size_t)i * BLOCK, *cj = s->ch + (size_t)j * BLOCK;
    int32_t both = 0, conflict = 0, changed = 0;
    v4d acc[5] = {{0}};
    for (int e = 0; e < n; e++) {
        uint32_t co = ui[e] & uj[e];
        both += co;
        conflict += co & opposite(x[e], y[e]);
        changed += ci[e] & cj[e];
    }
    for (int e = 0; e < n; e += 4) { /* entries past n are zeros (deltas) */
        v4f xf, yf;
        v4b cb, cj4;
        memcpy(&xf, x + e, sizeof xf);
        memcpy(&yf, y + e, sizeof yf);
        memcpy(&cb, ci + e, sizeof cb);
        memcpy(&cj4, cj + e, sizeof cj4);
        v4d dx = __builtin_convertvector(xf, v4d), dy = __builtin_convertvector(yf, v4d);
        v4d dp = __builtin_convertvector(xf * yf, v4d);
        v4l cc = -__builtin_convertvector(cb & cj4, v4l); /* all ones where changed in both */
        acc[0] += dp;
        acc[1] += (v4d)((v4l)(dp * dp) & (v4l)(dp < 0.0));
        acc[2] += (v4d)((v4l)dp & cc);
        acc[3] += (v4d)((v4l)(dx * dx) & cc);
        acc[4] += (v4d)((v4l)(dy * dy) & cc);
    }
    ints[0] += both; ints[1] += conflict; ints[2] += changed;
    for (int k = 0; k < 5; k++) sums[k] += lanes(acc[k]);
}

/* ints: [2 per model (updated, changed)] [3 per pair]; sums: [1 per model] [5 per pair] */
void an_pass1(const an_args *a, int t, int64_t first, int64_t last) {
    scratch s;
    if (!scratch_new(&s, a->nm)) abort();
    int64_t *ints = a->ints + (int64_t)t * a->nints;
    double *sums = a->sums + (int64_t)t * a->nsums;
    for (int64_t block = first; block < last; block++) {
        int64_t i0 = block * BLOCK;
        int n = (int)(a->n - i0 < BLOCK ? a->n - i0 : BLOCK);
        deltas(a, i0, n, &s);
        for (int k = 0; k < a->nm; k++) pass1_model(a, k, n, &s, a->hists[t * a->nm + k], ints, sums);
        int pair = 0;
        for (int i = 0; i < a->nm; i++)
            for (int j = i + 1; j < a->nm; j++, pair++)
                pass1_pair(i, j, n, &s, ints + 2 * a->nm + 3 * pair, sums + a->nm + 5 * pair);
    }
    fold_spare(a, t);
    scratch_free(&s);
}

/* the sample pre-pass (coarse bins of |Delta|) or pass 2 (fine keys inside boundary bins) */
void an_keys(const an_args *a, int t, int64_t first, int64_t last) {
    scratch s;
    if (!scratch_new(&s, a->nm)) abort();
    for (int64_t block = first; block < last; block++) {
        int64_t i0 = block * BLOCK;
        int n = (int)(a->n - i0 < BLOCK ? a->n - i0 : BLOCK);
        deltas(a, i0, n, &s);
        for (int k = 0; k < a->nm; k++) {
            const float *d = s.d + (size_t)k * BLOCK;
            int64_t *hist = a->hists[t * a->nm + k];
            if (!hist) continue; /* pass 2: no boundary bin of this model to refine */
            const int32_t *table = a->tables ? a->tables[k] : NULL;
            for (int i = 0; i < n; i++) {
                uint32_t bits = bits_of(fabsf(d[i])), coarse = bits >> 16;
                if (!table) { hist[coarse]++; continue; }
                int64_t offset = table[coarse];
                hist[offset == a->dump ? a->dump : offset + (bits & 0xFFFFu)]++;
            }
        }
    }
    scratch_free(&s);
}

/* pass 3, one model: how many thresholds each |Delta| passes (|Delta| >= t), into ch;
 * updated into up; the entries passing the --top threshold into *top */
static void passed(const an_args *a, int k, int n, scratch *s, int64_t *top) {
    const float *d = s->d + (size_t)k * BLOCK, *values = a->values[k];
    const int32_t *weights = a->weights[k];
    uint8_t *up = s->up + (size_t)k * BLOCK, *count = s->ch + (size_t)k * BLOCK;
    float *mag = s->m + (size_t)k * BLOCK; /* model32 is not needed in pass 3 */
    const float epsilon = a->epsilon;
    const int32_t always = a->always[k];
    int nv = a->ndistinct[k], slot = a->top_slots[k];
    int32_t kept = 0, wide[BLOCK]; /* int32 counts: no packing to bytes per compare */
    for (int i = 0; i < n; i++) {
        mag[i] = fabsf(d[i]);
        up[i] = mag[i] > epsilon;
        wide[i] = always;
    }
    for (int v = 0; v < nv; v++) { /* a repeated threshold: one compare (|Delta| is finite here) */
        const float t = values[v];
        const int32_t w = weights[v];
        for (int i = 0; i < n; i++) wide[i] += -(int32_t)(mag[i] >= t) & w;
    }
    for (int i = 0; i < n; i++) count[i] = (uint8_t)wide[i];
    for (int i = 0; i < n; i++) kept += wide[i] > slot;
    *top += kept;
}

/* pass 3, one pair: the joint histogram category * size + passed_a * width + passed_b
 * (category 0: not co-updated, 1: equal signs, 2: opposite signs) */
static void pass3_pair(const an_args *a, int i, int j, int n, scratch *s, int32_t *code, int32_t *sub) {
    const float *x = s->d + (size_t)i * BLOCK, *y = s->d + (size_t)j * BLOCK;
    const uint8_t *ui = s->up + (size_t)i * BLOCK, *uj = s->up + (size_t)j * BLOCK;
    const uint8_t *pi = s->ch + (size_t)i * BLOCK, *pj = s->ch + (size_t)j * BLOCK;
    int32_t width = a->nvalues[j] + 1, size = (a->nvalues[i] + 1) * width;
    for (int e = 0; e < n; e++) {
        uint32_t co = ui[e] & uj[e];
        code[e] = (int32_t)(co + (co & opposite(x[e], y[e]))) * size + pi[e] * width + pj[e];
    }
    int e = 0; /* four sub-histograms: few codes, so consecutive entries often share one */
    for (; e + 4 <= n; e += 4) {
        sub[4 * code[e]]++;
        sub[4 * code[e + 1] + 1]++;
        sub[4 * code[e + 2] + 2]++;
        sub[4 * code[e + 3] + 3]++;
    }
    for (; e < n; e++) sub[4 * code[e]]++;
}

/* ints: [1 per model (entries passing the --top threshold)]; hists: [t * npairs + pair]
 * (thresholds per model < 255) */
void an_pass3(const an_args *a, int t, int64_t first, int64_t last) {
    scratch s;
    int32_t code[BLOCK];
    int npairs = a->nm * (a->nm - 1) / 2;
    int64_t *sizes = malloc(sizeof(int64_t) * (npairs + 1)), total = 0;
    int pair = 0;
    for (int i = 0; i < a->nm; i++)
        for (int j = i + 1; j < a->nm; j++, pair++) total += sizes[pair] = 3 * (int64_t)(a->nvalues[i] + 1) * (a->nvalues[j] + 1);
    int32_t *subs = calloc((size_t)(4 * total + 1), sizeof(int32_t)); /* per pair, 4 interleaved histograms */
    if (!sizes || !subs || !scratch_new(&s, a->nm)) abort();
    int64_t *ints = a->ints + (int64_t)t * a->nints;
    for (int64_t block = first; block < last; block++) {
        int64_t i0 = block * BLOCK;
        int n = (int)(a->n - i0 < BLOCK ? a->n - i0 : BLOCK);
        deltas(a, i0, n, &s);
        for (int k = 0; k < a->nm; k++) passed(a, k, n, &s, ints + k);
        int32_t *sub = subs;
        pair = 0;
        for (int i = 0; i < a->nm; i++)
            for (int j = i + 1; j < a->nm; j++, sub += 4 * sizes[pair++]) pass3_pair(a, i, j, n, &s, code, sub);
    }
    int32_t *sub = subs; /* < 2^31 entries per call */
    for (pair = 0; pair < npairs; sub += 4 * sizes[pair++]) {
        int64_t *hist = a->hists[t * npairs + pair];
        for (int64_t c = 0; c < sizes[pair]; c++) hist[c] += (int64_t)sub[4 * c] + sub[4 * c + 1] + sub[4 * c + 2] + sub[4 * c + 3];
    }
    free(subs);
    free(sizes);
    scratch_free(&s);
}
