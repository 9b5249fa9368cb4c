/* The AVX2 part of swap_kernel.c (included there, after the portable helpers it uses):
 * the permute tables, 8-wide loads and stores, and the touched entries of a task 8 at a
 * time for 1-4 vectors. Same float32 operations, same order, as the portable loop. */
#ifdef __AVX2__
/* per byte value: lane k takes the (set bits below k)-th of 8 consecutive values (PERM:
 * 32-bit lanes; SHUF16: the bytes of 16-bit lanes); lane k's bit (MASK, MASK16) */
static int32_t PERM[256][8] __attribute__((aligned(32))), MASK[256][8] __attribute__((aligned(32)));
static uint8_t SHUF16[256][16] __attribute__((aligned(16))), MASK16[256][16] __attribute__((aligned(16)));

static void tables(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0, r = 0; k < 8; k++) {
            int on = (b >> k) & 1;
            PERM[b][k] = r < 8 ? r : 7;
            MASK[b][k] = on ? -1 : 0;
            SHUF16[b][2 * k] = on ? 2 * r : 0x80, SHUF16[b][2 * k + 1] = on ? 2 * r + 1 : 0x80;
            MASK16[b][2 * k] = MASK16[b][2 * k + 1] = on ? 0xFF : 0;
            r += on;
        }
}

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


/* The touched entries [c0, c0 + m) of a task, float32 work, read straight from the
 * tensors (every load of 8 in bounds: the caller checks) and written to dst[d0...] in
 * the output dtype: per vector, 8 entries at a time, the next values moved into their
 * lanes (a permute chosen by the bitmask byte), the term computed and kept by the bits.
 * Lanes past m (the last 8) are computed and not used. NVEC is a constant where it is
 * inlined (1 to MAXVEC vectors: everything per vector in registers). */
#define MAXVEC 4
static inline __attribute__((always_inline)) void entries_avx2_n(const struct task *t, int64_t blk, int64_t c0,
                                                                  int m, void *dst, int64_t d0, const int NVEC) {
    int64_t at[MAXVEC];
    const uint8_t *bits[MAXVEC];
    const void *values[MAXVEC];
    int vdt[MAXVEC], re[MAXVEC], sc[MAXVEC];
    __m256 s[MAXVEC], c[MAXVEC];
    for (int j = 0; j < NVEC; j++) {
        bits[j] = t->bits[j], values[j] = t->values[j], vdt[j] = t->vdt[j];
        re[j] = t->recompute[j], sc[j] = t->has_scale[j];
        s[j] = _mm256_set1_ps((float)t->scale[j]), c[j] = _mm256_set1_ps((float)t->coef[j]);
        at[j] = bits[j] ? t->starts[j][blk] : c0;
    }
    const void *base = t->base;
    int bdt = t->bdt, odt = t->odt;
    for (int k = 0; k < m; k += 8) {
        int64_t e = c0 + k;
        __m256 b = load8(base, bdt, e), a = b;
        for (int j = 0; j < NVEC; j++) {
            __m256 v;
            unsigned byte = 0;
            if (bits[j]) {
                uint16_t two; /* (in bounds: avx2_ok) */
                memcpy(&two, bits[j] + (e >> 3), 2);
                byte = (two >> (e & 7)) & 0xFF;
                v = _mm256_permutevar8x32_ps(load8(values[j], vdt[j], at[j]),
                                             _mm256_load_si256((const __m256i *)PERM[byte]));
                at[j] += __builtin_popcount(byte);
            } else {
                v = load8(values[j], vdt[j], e);
            }
            if (re[j]) {
                v = _mm256_sub_ps(v, b);
                if (sc[j]) v = _mm256_mul_ps(v, s[j]);
            }
            v = _mm256_add_ps(a, _mm256_mul_ps(v, c[j]));
            a = bits[j] ? _mm256_blendv_ps(a, v, _mm256_load_ps((const float *)MASK[byte])) : v;
        }
        store8(dst, odt, d0 + k, a);
    }
}

static void entries_avx2(const struct task *t, int64_t blk, int64_t c0, int m, void *dst, int64_t d0) {
    switch (t->nvec) {
    case 0: entries_avx2_n(t, blk, c0, m, dst, d0, 0); break;
    case 1: entries_avx2_n(t, blk, c0, m, dst, d0, 1); break;
    case 2: entries_avx2_n(t, blk, c0, m, dst, d0, 2); break;
    case 3: entries_avx2_n(t, blk, c0, m, dst, d0, 3); break;
    case 4: entries_avx2_n(t, blk, c0, m, dst, d0, 4); break;
    }
}

/* whether entries_avx2 may do [c0, c0 + m) of block blk */
static int avx2_ok(const struct task *t, int64_t blk, int64_t c0, int m) {
    int64_t end = c0 + (m + 7) / 8 * 8;
    if (t->portable || t->work64 || t->nvec > MAXVEC || !VEC_DTYPE(t->bdt) || !VEC_DTYPE(t->odt) || end > t->count) return 0;
    if (!t->touched && m % 8) return 0;
    for (int j = 0; j < t->nvec; j++) {
        if (!VEC_DTYPE(t->vdt[j])) return 0;
        if ((t->bits[j] ? t->starts[j][blk + 1] + 8 : end) > t->nvalues[j]) return 0;
        if (t->bits[j] && (end >> 3) >= (t->count + 7) / 8) return 0; /* two bytes of bits read at a time */
    }
    return 1;
}
#endif
