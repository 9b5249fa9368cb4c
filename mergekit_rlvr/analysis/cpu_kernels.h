/* What every pass of cpu_kernels.c shares (included there): the arguments, the dtypes
 * widened to float32 as torch widens them, the block scratch and the deltas. */
#define BLOCK 1024
#define COARSE_BINS 32768
enum { BF16 = 0, F16 = 1, F32 = 2 };

typedef struct {
    int64_t n;                  /* entries in the chunk */
    int32_t nm;                 /* models */
    int32_t base_dtype;
    const void *base;
    const void *const *models;  /* [nm] */
    const int32_t *dtypes;      /* [nm] */
    float epsilon, eta;
    int32_t nints, nsums;       /* per-thread row lengths of ints and sums */
    const int32_t *const *tables;  /* [nm] coarse bin -> offset (pass 1: -1 = not refined; pass 2: dump) */
    int64_t *const *hists;      /* [t * nm + m] (pass 1, 2, sample) or [t * npairs + p] (pass 3) */
    int64_t *ints;              /* [t * nints + k] */
    double *sums;               /* [t * nsums + k] */
    const float *const *values; /* [nm] pass 3: the distinct finite thresholds */
    const int32_t *const *weights; /* [nm] how often each is among the model's thresholds */
    const int32_t *ndistinct;   /* [nm] */
    const int32_t *always;      /* [nm] thresholds every |Delta| passes (-inf) */
    const int32_t *nvalues;     /* [nm] thresholds (with repeats and infinities) */
    const int32_t *top_slots;   /* [nm] */
    int64_t dump;               /* pass 2: the key of entries outside every boundary bin */
    const int64_t *sizes;       /* [nm] pass 1: histogram sizes; each histogram has 8 spare counters after */
} an_args;

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 is exact in float32 */
        f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    u = sign | (exp == 31 ? 0x7F800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    memcpy(&f, &u, 4);
    return f;
}

static void widen(const void *p, int dtype, int64_t i0, int n, float *out) {
    if (dtype == F32) {
        memcpy(out, (const float *)p + i0, (size_t)n * 4);
    } else if (dtype == BF16) {
        const uint16_t *h = (const uint16_t *)p + i0;
        uint32_t *o = (uint32_t *)out;
        for (int i = 0; i < n; i++) o[i] = (uint32_t)h[i] << 16;
    } else {
        const uint16_t *h = (const uint16_t *)p + i0;
        for (int i = 0; i < n; i++) out[i] = f16_to_f32(h[i]);
    }
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* GCC/clang vector extensions: 4 double lanes per sum, whatever the target's SIMD
 * (no reassociation within a lane; the lanes are added at the end of a block) */
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef uint8_t v4b __attribute__((vector_size(4)));

static double lanes(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/* Block scratch: base32 [BLOCK], then per model model32, Delta [nm][BLOCK]; flags [2][nm][BLOCK]. */
typedef struct { float *b, *m, *d; uint8_t *up, *ch; } scratch;

static int scratch_new(scratch *s, int nm) {
    s->b = malloc(sizeof(float) * BLOCK * (1 + 2 * (size_t)nm));
    s->up = malloc((size_t)BLOCK * 2 * nm);
    if (!s->b || !s->up) { free(s->b); free(s->up); return 0; }
    s->m = s->b + BLOCK;
    s->d = s->m + (size_t)BLOCK * nm;
    s->ch = s->up + (size_t)BLOCK * nm;
    return 1;
}

static void scratch_free(scratch *s) { free(s->b); free(s->up); }

/* base32, model32 and Delta of entries [i0, i0 + n) */
static void deltas(const an_args *a, int64_t i0, int n, scratch *s) {
    widen(a->base, a->base_dtype, i0, n, s->b);
    for (int k = 0; k < a->nm; k++) {
        float *m = s->m + (size_t)k * BLOCK, *d = s->d + (size_t)k * BLOCK;
        widen(a->models[k], a->dtypes[k], i0, n, m);
        for (int i = 0; i < n; i++) d[i] = m[i] - s->b[i];
        for (int i = n; i < (n + 3) / 4 * 4; i++) d[i] = m[i] = 0.0f; /* zeros up to a multiple of 4 */
    }
    for (int i = n; i < (n + 3) / 4 * 4; i++) s->b[i] = 0.0f;
}
