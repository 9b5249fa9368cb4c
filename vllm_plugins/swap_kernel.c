/* The hot swap's arithmetic on packed storage, on CPU (vllm_plugins/cpu_kernel.py builds
 * and loads this file; vllm_plugins/packed.py documents the storage).
 *
 * Built with -O3 -ffp-contract=off and no fast-math: every float32 (float64) operation
 * below is the one torch does, rounded the same way (no FMA, no reassociation), so the
 * results are those of mergekit_rlvr.methods.common.combine bit for bit.
 *
 * Entries are taken in blocks of BLOCK (a multiple of 8: whole bytes of a bitmask); a
 * vector's compacted values are found by counting set bits, and the blocks' starting
 * places come from one cheap pass over the bitmask bytes, so blocks run in parallel (threads of the caller, each a range of blocks). */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 2048
#define MAXVEC 8

enum { BF16 = 0, F16 = 1, F32 = 2, F64 = 3 };

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

/* the positions (within the block) of the set bits of a block, and how many (branchless) */
static int block_places(const uint8_t *bits, int64_t lo, int n, int32_t *restrict where) {
    int m = 0;
    for (int i = 0; i < n; i += 8) {
        unsigned byte = bits[(lo + i) / 8];
        for (int k = 0; k < 8; k++) {
            where[m] = i + k;
            m += (byte >> k) & 1;
        }
    }
    return m; /* bits past n are zero (pack_bits pads with zeros) */
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
        for (int i = 0; i < n; i++) o[i] = a64[i];
    }
}

#ifdef __AVX2__
/* per byte value: lane k takes the (set bits below k)-th of 8 consecutive values; lane k's bit */
static int32_t PERM[256][8], MASK[256][8];

static void tables(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0, r = 0; k < 8; k++) {
            PERM[b][k] = r < 8 ? r : 7;
            MASK[b][k] = (b >> k) & 1 ? -1 : 0;
            r += (b >> k) & 1;
        }
}

#endif

#ifdef __AVX2__
/* 8 consecutive entries of src (dtype dt) from index at, widened to float32 */
static inline __m256 load8(const void *src, int dt, int64_t at) {
    if (dt == BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at))), 16));
#ifdef __F16C__
    if (dt == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at)));
#endif
    return _mm256_loadu_ps((const float *)src + at); /* F32 (callers check the dtypes) */
}

static inline void store8(void *out, int dt, int64_t at, __m256 a) {
    if (dt == F32) { _mm256_storeu_ps((float *)out + at, a); return; }
    __m256i h;
    if (dt == BF16) { /* round to nearest even; NaN as c10's 0x7FC0 */
        __m256i u = _mm256_castps_si256(a);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
        h = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_castsi256_si128(h));
        return;
    }
#ifdef __F16C__
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
}

#ifdef __F16C__
#define VEC_DTYPE(dt) ((dt) == BF16 || (dt) == F16 || (dt) == F32)
#else
#define VEC_DTYPE(dt) ((dt) == BF16 || (dt) == F32)
#endif

/* one block, float32 work, read and written straight from the tensors (every load of 8
 * in bounds): per vector, 8 entries at a time, the next values moved into their lanes
 * (a permute), the term computed and selected by the bits */
static void block_direct(int n, int64_t lo, const void *base, int bdt, void *out, int odt, int nvec,
                         const uint8_t *const *bits, const void *const *values, const int *vdt, int64_t *at,
                         const int *recompute, const int *has_scale, const float *s, const float *c) {
    for (int i = 0; i < n; i += 8) {
        __m256 b = load8(base, bdt, lo + i), a = b;
        for (int j = 0; j < nvec; j++) {
            __m256 t, keep;
            if (bits[j]) {
                unsigned byte = bits[j][(lo + i) / 8];
                t = _mm256_permutevar8x32_ps(load8(values[j], vdt[j], at[j]), _mm256_loadu_si256((const __m256i *)PERM[byte]));
                keep = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)MASK[byte]));
                at[j] += __builtin_popcount(byte);
            } else {
                t = load8(values[j], vdt[j], at[j]);
                keep = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
                at[j] += 8;
            }
            if (recompute[j]) {
                t = _mm256_sub_ps(t, b);
                if (has_scale[j]) t = _mm256_mul_ps(t, _mm256_set1_ps(s[j]));
            }
            t = _mm256_mul_ps(t, _mm256_set1_ps(c[j]));
            a = _mm256_blendv_ps(a, _mm256_add_ps(a, t), keep);
        }
        store8(out, odt, lo + i, a);
    }
}
#endif

/* once, before any other call */
void swap_init(void) {
#ifdef __AVX2__
    tables();
#endif
}

/* combine: out[i] = base[i] + sum_j c_j * v_j[i] at `count` touched entries.
 * Per vector j: bits[j] (NULL: every entry), values[j] (dtype vdt[j]), recompute[j]
 * (v = (values - base) [* scale[j] when has_scale[j]]; else v = values), coef[j].
 * work64: float64 work (a float64 merge). starts: per vector, swap_starts of its bits
 * (nblocks + 1 entries each). Blocks [first, last) only: callers split a tensor over threads. */
void swap_combine(int64_t count, const void *base, int bdt, void *out, int odt, int nvec,
                  const uint8_t *const *bits, const void *const *values, const int *vdt,
                  const int *recompute, const int *has_scale, const double *scale, const double *coef,
                  const int64_t *nvalues, int work64, const int64_t *starts, int64_t first, int64_t last) {
    int64_t nblocks = (count + BLOCK - 1) / BLOCK;
#ifdef __AVX2__
    int direct_ok = VEC_DTYPE(bdt) && VEC_DTYPE(odt);
    for (int j = 0; j < nvec; j++) direct_ok &= VEC_DTYPE(vdt[j]);
#endif
    for (int64_t blk = first; blk < last; blk++) {
        float b32[BLOCK + 8], a32[BLOCK + 8], v32[BLOCK];
        double b64[BLOCK], a64[BLOCK], v64[BLOCK];
        int32_t where[BLOCK];
        int64_t lo = blk * BLOCK;
        int n = count - lo < BLOCK ? (int)(count - lo) : BLOCK;
#ifdef __AVX2__
        if (!work64 && nvec <= MAXVEC && direct_ok && n % 8 == 0) {
            int64_t at[MAXVEC];
            float sf[MAXVEC], cf[MAXVEC];
            int ok = 1;
            for (int j = 0; j < nvec; j++) {
                at[j] = bits[j] ? starts[j * (nblocks + 1) + blk] : lo;
                int64_t last = bits[j] ? starts[j * (nblocks + 1) + blk + 1] : lo + n;
                ok &= last + 8 <= nvalues[j];
                sf[j] = (float)scale[j];
                cf[j] = (float)coef[j];
            }
            if (ok) {
                block_direct(n, lo, base, bdt, out, odt, nvec, bits, values, vdt, at, recompute, has_scale, sf, cf);
                continue;
            }
        }
#endif
        if (work64) widen_f64(b64, base, bdt, lo, n); else widen_f32(b32, base, bdt, lo, n);
        if (work64) memcpy(a64, b64, n * 8); else memcpy(a32, b32, n * 4);
        for (int j = 0; j < nvec; j++) {
            int m = n;
            int64_t at = lo;
            if (bits[j]) {
                m = block_places(bits[j], lo, n, where);
                at = starts[j * (nblocks + 1) + blk];
            }
            const int32_t *idx = bits[j] ? where : 0;
            if (work64) {
                widen_f64(v64, values[j], vdt[j], at, m);
                double s = scale[j], c = coef[j];
                for (int k = 0; k < m; k++) {
                    int i = idx ? idx[k] : k;
                    double t = v64[k];
                    if (recompute[j]) { t = t - b64[i]; if (has_scale[j]) t = t * s; }
                    a64[i] = a64[i] + t * c;
                }
            } else {
                widen_f32(v32, values[j], vdt[j], at, m);
                float s = (float)scale[j], c = (float)coef[j];
                if (!idx) {
                    if (!recompute[j]) for (int k = 0; k < m; k++) a32[k] = a32[k] + v32[k] * c;
                    else if (!has_scale[j]) for (int k = 0; k < m; k++) a32[k] = a32[k] + (v32[k] - b32[k]) * c;
                    else for (int k = 0; k < m; k++) a32[k] = a32[k] + ((v32[k] - b32[k]) * s) * c;
                } else {
                    if (!recompute[j]) for (int k = 0; k < m; k++) a32[idx[k]] = a32[idx[k]] + v32[k] * c;
                    else if (!has_scale[j])
                        for (int k = 0; k < m; k++) a32[idx[k]] = a32[idx[k]] + (v32[k] - b32[idx[k]]) * c;
                    else for (int k = 0; k < m; k++) a32[idx[k]] = a32[idx[k]] + ((v32[k] - b32[idx[k]]) * s) * c;
                }
            }
        }
        store(out, odt, lo, work64 ? a64 : 0, a32, n);
    }
}

/* scatter: out[i] = merged[rank of i among the set bits] where bit i of `touched` is set;
 * elsize: bytes per entry (out and merged share the dtype) */
void swap_scatter(int64_t numel, const uint8_t *touched, const void *merged, void *out, int elsize,
                  const int64_t *starts, int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; blk++) {
        int32_t where[BLOCK];
        int64_t lo = blk * BLOCK;
        int n = numel - lo < BLOCK ? (int)(numel - lo) : BLOCK;
        int64_t at = starts[blk];
#ifdef __AVX2__
        int64_t end = starts[blk + 1], total = starts[(numel + BLOCK - 1) / BLOCK];
        if ((elsize == 2 || elsize == 4) && end + 8 <= total && n % 8 == 0) {
            for (int i = 0; i < n; i += 8) { /* the next 8 merged values moved into their lanes */
                unsigned byte = touched[(lo + i) / 8];
                __m256i perm = _mm256_loadu_si256((const __m256i *)PERM[byte]);
                __m256i keep = _mm256_loadu_si256((const __m256i *)MASK[byte]);
                if (elsize == 2) {
                    uint16_t *o = (uint16_t *)out + lo + i;
                    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)merged + at)));
                    __m256i y = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)o));
                    y = _mm256_blendv_epi8(y, _mm256_permutevar8x32_epi32(x, perm), keep);
                    y = _mm256_permute4x64_epi64(_mm256_packus_epi32(y, y), 0x08);
                    _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(y));
                } else {
                    uint32_t *o = (uint32_t *)out + lo + i;
                    __m256i x = _mm256_loadu_si256((const __m256i *)((const uint32_t *)merged + at));
                    __m256i y = _mm256_blendv_epi8(_mm256_loadu_si256((const __m256i *)o),
                                                   _mm256_permutevar8x32_epi32(x, perm), keep);
                    _mm256_storeu_si256((__m256i *)o, y);
                }
                at += __builtin_popcount(byte);
            }
            continue;
        }
#endif
        int m = block_places(touched, lo, n, where);
        if (elsize == 2)
            for (int k = 0; k < m; k++) ((uint16_t *)out)[lo + where[k]] = ((const uint16_t *)merged)[at + k];
        else if (elsize == 4)
            for (int k = 0; k < m; k++) ((uint32_t *)out)[lo + where[k]] = ((const uint32_t *)merged)[at + k];
        else
            for (int k = 0; k < m; k++) ((uint64_t *)out)[lo + where[k]] = ((const uint64_t *)merged)[at + k];
    }
}
