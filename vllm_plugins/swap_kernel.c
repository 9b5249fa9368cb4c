/* The hot swap's arithmetic on packed storage, on CPU (vllm_plugins/cpu_kernel.py builds
 * and loads this file; vllm_plugins/packed.py documents the storage).
 *
 * Built with -O3 -ffp-contract=off and no fast-math: every float32 (float64) operation
 * below is the one torch does, rounded the same way (no FMA, no reassociation), so the
 * results are those of mergekit_rlvr.methods.common.combine bit for bit.
 *
 * swap_apply writes the merged values straight into the live tensor at its touched
 * entries, one pass: the tensor is taken in blocks of BLOCK entries (a multiple of 8:
 * whole bytes of its bitmask); a block's touched entries are combined into a small
 * buffer (in cache) and written out through the touched bitmask. Where each block's
 * touched entries and each vector's values start was computed once, when the storage
 * was packed (packed.pack), so blocks run in parallel (threads of the caller, each a
 * range of blocks). */
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 2048

enum { BF16 = 0, F16 = 1, F32 = 2, F64 = 3 };
static const int SIZE[4] = {2, 2, 4, 8};

/* one tensor's swap (cpu_kernel._Task mirrors it) */
struct task {
    const uint8_t *touched;        /* bits over out's numel entries (NULL: all touched) */
    const int64_t *tstarts;        /* per block of out: its first touched entry (nblocks + 1) */
    const void *base;              /* at the touched entries (count) */
    void *out;                     /* numel entries, dtype odt */
    const uint8_t *const *bits;    /* per vector: bits over the touched entries (NULL: all) */
    const int64_t *const *starts;  /* per vector with bits: its first value in each block of out */
    const void *const *values;
    const int *vdt, *recompute, *has_scale;
    const int64_t *nvalues;
    const double *scale, *coef;
    int64_t numel, count;
    int bdt, odt, work64, portable, nvec;
};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* widen n contiguous entries of src (dtype dt) from index `at` into dst (float or double);
 * one loop per dtype, so each vectorizes */
#define WIDEN(WORK, NAME)                                                                              \
    static void NAME(WORK *restrict dst, const void *src, int dt, int64_t at, int n) {                \
        if (dt == BF16) {                                                                              \
            const uint16_t *p = (const uint16_t *)src + at;                                            \
            for (int i = 0; i < n; i++) dst[i] = (WORK)bf16_to_f32(p[i]);                              \
        } else if (dt == F16) {                                                                        \
            const _Float16 *p = (const _Float16 *)src + at;                                            \
            for (int i = 0; i < n; i++) dst[i] = (WORK)(float)p[i];                                    \
        } else if (dt == F32) {                                                                        \
            const float *p = (const float *)src + at;                                                  \
            for (int i = 0; i < n; i++) dst[i] = (WORK)p[i];                                           \
        } else {                                                                                       \
            const double *p = (const double *)src + at;                                                \
            for (int i = 0; i < n; i++) dst[i] = (WORK)p[i];                                           \
        }                                                                                              \
    }
WIDEN(float, widen_f32)
WIDEN(double, widen_f64)

static inline int popcount8(uint8_t b) { return __builtin_popcount((unsigned)b); }

/* starting place of each block of `count` entries among the set bits of `bits`
 * ((count + BLOCK - 1) / BLOCK + 1 entries, the last: every set bit) */
void swap_starts(const uint8_t *bits, int64_t count, int64_t *starts) {
    int64_t nbytes = (count + 7) / 8, nblocks = (count + BLOCK - 1) / BLOCK;
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t lo = b * (BLOCK / 8), hi = lo + BLOCK / 8 < nbytes ? lo + BLOCK / 8 : nbytes;
        int64_t s = 0;
        for (int64_t k = lo; k < hi; k++) s += popcount8(bits[k]);
        starts[b + 1] = s;
    }
    starts[0] = 0;
    for (int64_t b = 0; b < nblocks; b++) starts[b + 1] += starts[b];
}

/* 8 bits of `bits` (nbytes bytes) from bit c on, any alignment (c < 8 * nbytes) */
static inline unsigned bits8(const uint8_t *bits, int64_t nbytes, int64_t c) {
    int64_t k = c >> 3;
    unsigned lo = bits[k], hi = k + 1 < nbytes ? bits[k + 1] : 0;
    return ((lo | hi << 8) >> (c & 7)) & 0xFF;
}

/* the positions (from c) of the set bits of `bits` in [c, c + n), and how many (branchless) */
static int places(const uint8_t *bits, int64_t nbytes, int64_t c, int n, int32_t *restrict where) {
    int m = 0;
    for (int i = 0; i < n; i += 8) {
        unsigned byte = bits8(bits, nbytes, c + i);
        if (n - i < 8) byte &= (1u << (n - i)) - 1;
        for (int k = 0; k < 8; k++) {
            where[m] = i + k;
            m += (byte >> k) & 1;
        }
    }
    return m;
}

static void store(void *out, int dt, int64_t at, const double *a64, const float *a32, int n) {
    if (dt == BF16) {
        uint16_t *o = (uint16_t *)out + at;
        for (int i = 0; i < n; i++) o[i] = f32_to_bf16(a32[i]);
    } else if (dt == F16) {
        _Float16 *o = (_Float16 *)out + at;
        for (int i = 0; i < n; i++) o[i] = (_Float16)a32[i];
    } else if (dt == F32) {
        float *o = (float *)out + at;
        for (int i = 0; i < n; i++) o[i] = a64 ? (float)a64[i] : a32[i];
    } else {
        double *o = (double *)out + at;
        for (int i = 0; i < n; i++) o[i] = a64 ? a64[i] : (double)a32[i];
    }
}

#include "swap_avx2.h"

/* once, before any other call */
void swap_init(void) {
#ifdef __AVX2__
    tables();
#endif
}

/* The touched entries [c0, c0 + m) of a task into buf (the output dtype), portable C. */
static void entries_c(const struct task *t, int64_t blk, int64_t c0, int m, void *buf) {
    float b32[BLOCK], a32[BLOCK], v32[BLOCK];
    double b64[BLOCK], a64[BLOCK], v64[BLOCK];
    int32_t where[BLOCK + 8];
    int64_t nb = (t->count + 7) / 8;
    int w = t->work64;
    if (w) widen_f64(b64, t->base, t->bdt, c0, m); else widen_f32(b32, t->base, t->bdt, c0, m);
    if (w) memcpy(a64, b64, m * 8); else memcpy(a32, b32, m * 4);
    for (int j = 0; j < t->nvec; j++) {
        const int32_t *idx = t->bits[j] ? where : 0;
        int n = idx ? places(t->bits[j], nb, c0, m, where) : m;
        int64_t at = idx ? t->starts[j][blk] : c0;
        int re = t->recompute[j], sc = t->has_scale[j];
        if (w) {
            widen_f64(v64, t->values[j], t->vdt[j], at, n);
            double s = t->scale[j], c = t->coef[j];
            for (int k = 0; k < n; k++) {
                int i = idx ? idx[k] : k;
                double v = v64[k];
                if (re) { v = v - b64[i]; if (sc) v = v * s; }
                a64[i] = a64[i] + v * c;
            }
        } else {
            widen_f32(v32, t->values[j], t->vdt[j], at, n);
            float s = (float)t->scale[j], c = (float)t->coef[j];
            if (!idx) {
                if (!re) for (int k = 0; k < n; k++) a32[k] = a32[k] + v32[k] * c;
                else if (!sc) for (int k = 0; k < n; k++) a32[k] = a32[k] + (v32[k] - b32[k]) * c;
                else for (int k = 0; k < n; k++) a32[k] = a32[k] + ((v32[k] - b32[k]) * s) * c;
            } else {
                if (!re) for (int k = 0; k < n; k++) a32[idx[k]] = a32[idx[k]] + v32[k] * c;
                else if (!sc) for (int k = 0; k < n; k++) a32[idx[k]] = a32[idx[k]] + (v32[k] - b32[idx[k]]) * c;
                else for (int k = 0; k < n; k++) a32[idx[k]] = a32[idx[k]] + ((v32[k] - b32[idx[k]]) * s) * c;
            }
        }
    }
    store(buf, t->odt, 0, w ? a64 : 0, a32, m);
}

/* out[lo + i] = merged[at + rank of i among the set bits] for the set bits i of touched's
 * block [lo, lo + n) (m of them; merged holds at least 8 more entries past them when wide) */
static void scatter_block(const uint8_t *touched, int64_t lo, int n, int m, const void *merged, int64_t at,
                          int wide, void *out, int elsize, int portable) {
    int32_t where[BLOCK + 8];
#ifdef __AVX2__
    if (!portable && wide && (elsize == 2 || elsize == 4) && n % 8 == 0) {
        for (int i = 0; i < n; i += 8) { /* the next 8 merged values moved into their lanes */
            unsigned byte = touched[(lo + i) / 8];
            if (!byte) continue;
            if (elsize == 2) {
                uint16_t *o = (uint16_t *)out + lo + i;
                __m128i x = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((const uint16_t *)merged + at)),
                                             _mm_load_si128((const __m128i *)SHUF16[byte]));
                _mm_storeu_si128((__m128i *)o, _mm_blendv_epi8(_mm_loadu_si128((const __m128i *)o), x,
                                                               _mm_load_si128((const __m128i *)MASK16[byte])));
            } else {
                float *o = (float *)out + lo + i;
                __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)merged + at),
                                                    _mm256_load_si256((const __m256i *)PERM[byte]));
                _mm256_storeu_ps(o, _mm256_blendv_ps(_mm256_loadu_ps(o), x, _mm256_load_ps((const float *)MASK[byte])));
            }
            at += __builtin_popcount(byte);
        }
        return;
    }
#endif
    places(touched, (lo + n + 7) / 8, lo, n, where);
    if (elsize == 2)
        for (int k = 0; k < m; k++) ((uint16_t *)out)[lo + where[k]] = ((const uint16_t *)merged)[at + k];
    else if (elsize == 4)
        for (int k = 0; k < m; k++) ((uint32_t *)out)[lo + where[k]] = ((const uint32_t *)merged)[at + k];
    else
        for (int k = 0; k < m; k++) ((uint64_t *)out)[lo + where[k]] = ((const uint64_t *)merged)[at + k];
}

/* scatter: out[i] = merged[rank of i among the set bits] where bit i of `touched` is set;
 * elsize: bytes per entry (out and merged share the dtype); starts: swap_starts of touched */
void swap_scatter(int64_t numel, const uint8_t *touched, const void *merged, void *out, int elsize,
                  const int64_t *starts, int64_t first, int64_t last) {
    int64_t total = starts[(numel + BLOCK - 1) / BLOCK];
    for (int64_t blk = first; blk < last; blk++) {
        int64_t lo = blk * BLOCK;
        int n = numel - lo < BLOCK ? (int)(numel - lo) : BLOCK;
        scatter_block(touched, lo, n, (int)(starts[blk + 1] - starts[blk]), merged, starts[blk],
                      starts[blk + 1] + 8 <= total, out, elsize, 0);
    }
}

/* apply: the merged values written into t->out at its touched entries, blocks [first, last) */
void swap_apply(const struct task *t, int64_t first, int64_t last) {
    _Alignas(32) char buf[(BLOCK + 8) * 8];
    int es = SIZE[t->odt];
    for (int64_t blk = first; blk < last; blk++) {
        int64_t lo = blk * BLOCK, c0 = t->touched ? t->tstarts[blk] : lo;
        int n = t->numel - lo < BLOCK ? (int)(t->numel - lo) : BLOCK;
        int m = t->touched ? (int)(t->tstarts[blk + 1] - c0) : n;
        if (!m) continue;
#ifdef __AVX2__
        if (avx2_ok(t, blk, c0, m)) {
            if (!t->touched) { entries_avx2(t, blk, c0, m, t->out, c0); continue; }
            entries_avx2(t, blk, c0, m, buf, 0);
        } else
#endif
            entries_c(t, blk, c0, m, buf);
        if (t->touched)
            scatter_block(t->touched, lo, n, m, buf, 0, 1, t->out, es, t->portable);
        else
            memcpy((char *)t->out + lo * es, buf, (size_t)m * es);
    }
}

/* blocks [first, last) of a swap over several tasks, numbered across them (task i: [edges[i], edges[i + 1])) */
struct span {
    const struct task *const *tasks;
    const int64_t *edges;
    int ntasks;
    int64_t first, last;
};

static void *run_span(void *arg) {
    const struct span *s = arg;
    for (int i = 0; i < s->ntasks; i++) {
        int64_t a = s->first > s->edges[i] ? s->first : s->edges[i];
        int64_t b = s->last < s->edges[i + 1] ? s->last : s->edges[i + 1];
        if (a < b) swap_apply(s->tasks[i], a - s->edges[i], b - s->edges[i]);
    }
    return 0;
}

/* apply_all: swap_apply on every block of ntasks tasks, split into `threads` equal runs
 * of blocks. Built with OpenMP (-fopenmp), the runs go to the process's OpenMP pool:
 * torch's own (the same libgomp.so.1, loaded once), whose idle workers spin for a
 * while after each torch op and would otherwise hold the cores new threads need;
 * without it, to threads of its own (the caller's thread takes the first run). */
void swap_apply_all(const struct task *const *tasks, const int64_t *edges, int ntasks, int threads) {
    int64_t total = edges[ntasks];
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        int k = omp_get_thread_num(), n = omp_get_num_threads();
        struct span span = {tasks, edges, ntasks, total * k / n, total * (k + 1) / n};
        run_span(&span);
    }
#else
    struct span spans[threads];
    pthread_t ids[threads];
    int started[threads];
    for (int k = 0; k < threads; k++) {
        spans[k] = (struct span){tasks, edges, ntasks, total * k / threads, total * (k + 1) / threads};
        started[k] = k > 0 && pthread_create(&ids[k], 0, run_span, &spans[k]) == 0;
    }
    for (int k = 0; k < threads; k++)
        if (!started[k]) run_span(&spans[k]); /* the first run, and any whose thread did not start */
    for (int k = 1; k < threads; k++)
        if (started[k]) pthread_join(ids[k], 0);
#endif
}

/* combine: out[k] = base[k] + sum_j c_j * v_j[k] for the `count` touched entries
 * themselves (the compact merged values; swap_apply with every entry touched).
 * Per vector j: bits[j] (NULL: every entry), values[j] (dtype vdt[j]), recompute[j]
 * (v = (values - base) [* scale[j] when has_scale[j]]; else v = values), coef[j].
 * work64: float64 work (a float64 merge). starts: per vector, swap_starts of its bits
 * (nblocks + 1 entries each). Blocks [first, last) only: callers split a tensor over threads. */
void swap_combine(int64_t count, const void *base, int bdt, void *out, int odt, int nvec,
                  const uint8_t *const *bits, const void *const *values, const int *vdt,
                  const int *recompute, const int *has_scale, const double *scale, const double *coef,
                  const int64_t *nvalues, int work64, int portable, const int64_t *starts, int64_t first,
                  int64_t last) {
    const int64_t *rows[nvec > 0 ? nvec : 1];
    for (int j = 0; j < nvec; j++) rows[j] = starts + j * ((count + BLOCK - 1) / BLOCK + 1);
    struct task t = {0, 0, base, out, bits, rows, values, vdt, recompute, has_scale, nvalues, scale, coef,
                     count, count, bdt, odt, work64, portable, nvec};
    swap_apply(&t, first, last);
}
