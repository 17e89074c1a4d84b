/* Decode attention on the CPU straight from the codes of one quantized store (docs/STORAGE_LAYOUT.md), the 16-bit
 * stores every row attends alike joining the same softmax: the compiled twin of kernels/reference.py's decode. Built
 * by kernels/cpu_decode.py with the host's C compiler (no torch headers: a build of about two seconds) and called
 * through ctypes.
 *
 * One task is one (batch row, kv head) pair: its R query rows (pre-scaled by sm_scale) against the row's tokens.
 * Pass 1 dequantizes a tile of 16 tokens' keys into L1 once (code * scale + zero per group, or per channel for KIVI
 * keys) and takes every row's dot products with it, 8 tokens per transpose-add reduction tree. Then one softmax per
 * row (logits written to the H2O scores on the way), and pass 2 dequantizes the values tile by tile and accumulates
 * p * v into registers. Vectors are GCC vector extensions (8 floats), so the same source compiles to AVX2, AVX-512
 * or NEON; tasks run in parallel under OpenMP (torch's own runtime once torch is loaded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define LANES 8
#define TILE 16      /* tokens converted per tile: TILE * D floats stay in L1 */
#define MAX_GROUPS 32
#define MAX_ROWS 64
#define MAX_PLAIN 4
#define LOG2E 1.4426950408889634f

typedef struct {
    const uint8_t *codes;        /* (pages, heads, slots, D * bits / 8) */
    const _Float16 *scale;       /* (pages, heads, slots, D / group) */
    const _Float16 *zero;
    int64_t codes_strides[3];    /* page, head, slot (elements; columns are contiguous) */
    int64_t scale_strides[3];
    int64_t bits;
    int64_t group;               /* head-dim elements per (scale, zero) */
    int64_t block;               /* keys per channel over blocks of this many slots (0: per token): the D scales of
                                    the block starting at slot s sit at slots s.., contiguous (slot layout) */
} kvp_field;

typedef struct {
    kvp_field k, v;
    const int32_t *table;        /* (B, max_pages) */
    int64_t table_stride;
    int64_t page_size;
    int64_t pages;               /* pages in the pool: a table entry outside [0, pages) fails the call */
    const int32_t *start, *end;  /* (B,), or NULL: every row attends [start_all, end_all) */
    int64_t start_all, end_all;
} kvp_store;

/* A 16-bit store every row attends over the same tokens [start, end) (the fp sinks, the fp window): its tokens join
 * the codes' softmax. */
typedef struct {
    const void *k, *v;           /* (pages, heads, slots, D) float32 / float16 / bfloat16, contiguous columns */
    int64_t k_strides[3];        /* page, head, slot (elements) */
    int64_t v_strides[3];
    int64_t dtype;               /* 0 float32, 1 float16, 2 bfloat16 */
    const int32_t *table;        /* (B, max_pages) */
    int64_t table_stride;
    int64_t page_size;
    int64_t pages;
    int64_t start, end;
    int64_t score_offset;        /* where its logits go in kvp_call.scores */
} kvp_segment;

typedef struct {
    kvp_segment segments[MAX_PLAIN];
    int64_t count;
    const float *q;              /* (B, H, R, D): their queries when the codes' are rotated (NULL: the same) */
    float *out;                  /* (B, H, R, D): their share of the output apart (NULL: summed into the output) */
} kvp_plain;

typedef struct {
    const float *q;              /* (B, H, R, D) float32, pre-scaled by sm_scale (and rotated into the codes' frame) */
    int64_t batch, heads, rows, head_dim;
    int64_t col0, width;         /* the codes' logits sit at column t - col0 of a scratch row of width + plain tokens */
    float *scratch;              /* (B, H, R, width + plain length) */
    float *scores;               /* (B, H * R, L) log2-domain logits, or NULL: a store's token t at column offset + t */
    int64_t scores_strides[2];
    int64_t score_offset;        /* the codes store's offset */
    float *out, *lse;            /* (B, H, R, D) normalised, (B, H, R) natural log */
    int64_t threads;
} kvp_call;

/* 8 bytes as 8 int32 lanes: one vpmovzxbd on x86 (GCC scalarises the generic conversion of an 8-byte vector). */
static inline v8i widen(const uint8_t *src) {
#if defined(__AVX2__)
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src));
#else
    v8u8 raw;
    memcpy(&raw, src, LANES);
    return __builtin_convertvector(raw, v8i);
#endif
}

/* load_tile for keys per channel (KIVI, docs/STORAGE_LAYOUT.md): token t of the block starting at slot s is
 * code * scale[d] + zero[d] with the block's D scales and zeros read once per block from slots s.. (contiguous). */
static inline __attribute__((always_inline)) void load_channel_tile(const kvp_field *f, const int bits,
                                                                    const int head_dim, int64_t page, int64_t head,
                                                                    int64_t slot, int n, float *tile) {
    const int width = head_dim * bits / 8, parts = 8 / bits;
    float scale[128], zero[128];
    int64_t loaded = -1;
    for (int t = 0; t < n; t++) {
        const int64_t first = (slot + t) / f->block * f->block;
        if (first != loaded) {
            const int64_t at = page * f->scale_strides[0] + head * f->scale_strides[1] + first * f->scale_strides[2];
            for (int d = 0; d < head_dim; d++) {
                scale[d] = (float)f->scale[at + d];
                zero[d] = (float)f->zero[at + d];
            }
            loaded = first;
        }
        const uint8_t *src = f->codes + page * f->codes_strides[0] + head * f->codes_strides[1]
                             + (slot + t) * f->codes_strides[2];
        float *dst = tile + t * head_dim;
        for (int j = 0; j < width; j += LANES) {
            const v8i wide = widen(src + j);
            for (int k = 0; k < parts; k++) {
                const v8i code = bits == 8 ? wide : (wide >> (bits * k)) & ((1 << bits) - 1);
                v8f sv, zv;
                memcpy(&sv, scale + k * width + j, sizeof sv);
                memcpy(&zv, zero + k * width + j, sizeof zv);
                const v8f x = __builtin_convertvector(code, v8f) * sv + zv;
                memcpy(dst + k * width + j, &x, sizeof x);
            }
        }
    }
}

/* A tile of n tokens from slot `slot` of one page, dequantized into floats (n, D): code * scale + zero per group.
 * Part k of every byte is head-dim elements [k * width, (k + 1) * width); `bits` and `head_dim` are constants at
 * every call site (the specialised tasks), so shifts, masks and the chunk loop unroll. The tile stays in L1 and is
 * read by every query row of the kv head, so dequantizing here costs one multiply-add per element, once. */
static inline __attribute__((always_inline)) void load_tile(const kvp_field *f, const int bits, const int head_dim,
                                                            int64_t page, int64_t head, int64_t slot, int n,
                                                            float *tile) {
    const int width = head_dim * bits / 8, parts = 8 / bits, groups = head_dim / (int)f->group;
    const uint8_t *codes = f->codes + page * f->codes_strides[0] + head * f->codes_strides[1]
                           + slot * f->codes_strides[2];
    const int64_t at = page * f->scale_strides[0] + head * f->scale_strides[1] + slot * f->scale_strides[2];
    if (f->block) {
        load_channel_tile(f, bits, head_dim, page, head, slot, n, tile);
        return;
    }
    for (int t = 0; t < n; t++) {
        float scale[MAX_GROUPS], zero[MAX_GROUPS];
        for (int g = 0; g < groups; g++) {
            scale[g] = (float)f->scale[at + t * f->scale_strides[2] + g];
            zero[g] = (float)f->zero[at + t * f->scale_strides[2] + g];
        }
        const uint8_t *src = codes + t * f->codes_strides[2];
        float *dst = tile + t * head_dim;
        for (int j = 0; j < width; j += LANES) {
            const v8i wide = widen(src + j);
            for (int k = 0; k < parts; k++) {
                const v8i code = bits == 8 ? wide : (wide >> (bits * k)) & ((1 << bits) - 1);
                const int g = (k * width + j) / (int)f->group;
                const v8f x = __builtin_convertvector(code, v8f) * scale[g] + zero[g];
                memcpy(dst + k * width + j, &x, sizeof x);
            }
        }
    }
}

/* The 8 sums of 8 vectors (one per token), in token order: a transpose-and-add tree (14 shuffles, 7 adds) instead of
 * 8 horizontal sums. */
static inline v8f sum8(const v8f x[8]) {
    const v8i even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const v8i low_pairs = {0, 1, 8, 9, 4, 5, 12, 13}, high_pairs = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i low_half = {0, 1, 2, 3, 8, 9, 10, 11}, high_half = {4, 5, 6, 7, 12, 13, 14, 15};
    v8f pairs[4], quads[2];
    for (int j = 0; j < 4; j++)
        pairs[j] = __builtin_shuffle(x[2 * j], x[2 * j + 1], even) + __builtin_shuffle(x[2 * j], x[2 * j + 1], odd);
    for (int j = 0; j < 2; j++)
        quads[j] = __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], low_pairs)
                   + __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], high_pairs);
    return __builtin_shuffle(quads[0], quads[1], low_half) + __builtin_shuffle(quads[0], quads[1], high_half);
}

/* Tokens [start, end) of row b as runs within one page, at most TILE tokens each, running BODY with page, slot, n
 * and first (the run's first token); returns 0 from the enclosing function at a table entry outside the pool. */
#define FOR_EACH_RUN(s, b, start, end, BODY)                                                                      \
    do {                                                                                                           \
        const int32_t *table_ = (s)->table + (b) * (s)->table_stride;                                             \
        for (int64_t t_ = (start); t_ < (end);) {                                                                 \
            const int64_t page = table_[t_ / (s)->page_size], slot = t_ % (s)->page_size;                         \
            if (page < 0 || page >= (s)->pages) return 0;                                                          \
            int n = (int)((s)->page_size - slot);                                                                  \
            if (n > TILE) n = TILE;                                                                                \
            if (n > (end) - t_) n = (int)((end) - t_);                                                            \
            const int64_t first = t_;                                                                              \
            BODY;                                                                                                  \
            t_ += n;                                                                                               \
        }                                                                                                          \
    } while (0)

/* Logits out[t] = q . x_t of one query row against n float tokens x (n, D), 8 tokens per reduction tree. */
static inline __attribute__((always_inline)) void row_dots(const v8f *qv, const float *x, int n, const int head_dim,
                                                           float *out) {
    const int chunks = head_dim / LANES;
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f dots[8];
        for (int u = 0; u < 8; u++) {
            v8f acc = {0};
            for (int i = 0; i < chunks; i++) {
                v8f kv;
                memcpy(&kv, x + (t + u) * head_dim + i * LANES, sizeof kv);
                acc += qv[i] * kv;
            }
            dots[u] = acc;
        }
        const v8f sums = sum8(dots);
        memcpy(out + t, &sums, sizeof sums);
    }
    for (; t < n; t++) {
        v8f acc = {0};
        for (int i = 0; i < chunks; i++) {
            v8f kv;
            memcpy(&kv, x + t * head_dim + i * LANES, sizeof kv);
            acc += qv[i] * kv;
        }
        float total = 0.0f;
        for (int l = 0; l < LANES; l++) total += acc[l];
        out[t] = total;
    }
}

/* acc (D) += sum_t p[t] * x_t over n float tokens x (n, D). */
static inline __attribute__((always_inline)) void row_sums(v8f *acc, const float *p, const float *x, int n,
                                                           const int head_dim) {
    const int chunks = head_dim / LANES;
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < chunks; i++) {
            v8f vv;
            memcpy(&vv, x + t * head_dim + i * LANES, sizeof vv);
            acc[i] += p[t] * vv;
        }
    }
}

/* Pass 1 (returns 0 at a bad table entry): logits (R, width) of rows q (R, D) against the keys of tokens [start, end) (column t - col0). */
static inline __attribute__((always_inline)) int key_logits(const kvp_store *s, const int bits, const int head_dim,
                                                             int64_t b, int64_t h, const float *q, int rows,
                                                             int64_t start, int64_t end, int64_t col0, float *logits,
                                                             int64_t width) {
    float tile[TILE * 128] __attribute__((aligned(32)));
    FOR_EACH_RUN(s, b, start, end, {
        load_tile(&s->k, bits, head_dim, page, h, slot, n, tile);
        for (int r = 0; r < rows; r++) {
            v8f qv[128 / LANES];
            memcpy(qv, q + r * head_dim, head_dim * sizeof(float));
            row_dots(qv, tile, n, head_dim, logits + r * width + (first - col0));
        }
    });
    return 1;
}

/* Pass 2 (returns 0 at a bad table entry): acc (R, D) += sum_t p[r, t] * v_t for probabilities p (R, width) (column t - col0). */
static inline __attribute__((always_inline)) int value_sums(const kvp_store *s, const int bits, const int head_dim,
                                                             int64_t b, int64_t h, const float *probs, int rows,
                                                             int64_t start, int64_t end, int64_t col0, int64_t width,
                                                             float *acc) {
    float tile[TILE * 128] __attribute__((aligned(32)));
    FOR_EACH_RUN(s, b, start, end, {
        load_tile(&s->v, bits, head_dim, page, h, slot, n, tile);
        for (int r = 0; r < rows; r++) {
            v8f av[128 / LANES];
            memcpy(av, acc + r * head_dim, head_dim * sizeof(float));
            row_sums(av, probs + r * width + (first - col0), tile, n, head_dim);
            memcpy(acc + r * head_dim, av, head_dim * sizeof(float));
        }
    });
    return 1;
}

/* n tokens of one plain field from slot `slot` of a page, as floats (n, D). */
static inline __attribute__((always_inline)) void load_plain_tile(const void *field, const int64_t *strides,
                                                                  int64_t dtype, int64_t page, int64_t head,
                                                                  int64_t slot, int n, const int head_dim,
                                                                  float *tile) {
    const int64_t at = page * strides[0] + head * strides[1] + slot * strides[2];
    for (int t = 0; t < n; t++) {
        float *dst = tile + t * head_dim;
        const int64_t row = at + t * strides[2];
        if (dtype == 0) {
            memcpy(dst, (const float *)field + row, head_dim * sizeof(float));
        } else if (dtype == 1) {
            const _Float16 *src = (const _Float16 *)field + row;
            for (int d = 0; d < head_dim; d++) dst[d] = (float)src[d];
        } else {
            const uint16_t *src = (const uint16_t *)field + row;
            for (int d = 0; d < head_dim; d++) {
                const uint32_t bits = (uint32_t)src[d] << 16;
                memcpy(dst + d, &bits, sizeof bits);
            }
        }
    }
}

/* Logits of rows q (R, D) against every plain segment's keys, at columns `column` on of each row (row stride
 * `full`), segment after segment, and in the log2 domain to the call's scores when asked. Returns 0 at a bad table
 * entry. */
static inline __attribute__((always_inline)) int plain_logits(const kvp_plain *plain, const kvp_call *c,
                                                              const int head_dim, int64_t b, int64_t h,
                                                              const float *q, int rows, int64_t column,
                                                              float *logits, int64_t full) {
    float tile[TILE * 128] __attribute__((aligned(32)));
    for (int i = 0; i < plain->count; i++) {
        const kvp_segment *seg = &plain->segments[i];
        FOR_EACH_RUN(seg, b, seg->start, seg->end, {
            load_plain_tile(seg->k, seg->k_strides, seg->dtype, page, h, slot, n, head_dim, tile);
            for (int r = 0; r < rows; r++) {
                v8f qv[128 / LANES];
                memcpy(qv, q + r * head_dim, head_dim * sizeof(float));
                float *row = logits + r * full + column + (first - seg->start);
                row_dots(qv, tile, n, head_dim, row);
                if (c->scores) {
                    float *scores = c->scores + b * c->scores_strides[0] + (h * rows + r) * c->scores_strides[1]
                                    + seg->score_offset + first;
                    for (int t = 0; t < n; t++) scores[t] = row[t] * LOG2E;
                }
            }
        });
        column += seg->end - seg->start;
    }
    return 1;
}

/* acc (R, D) += the plain segments' values weighted by the probabilities at columns `column` on. Returns 0 at a bad
 * table entry. */
static inline __attribute__((always_inline)) int plain_sums(const kvp_plain *plain, const int head_dim, int64_t b,
                                                            int64_t h, const float *probs, int rows, int64_t column,
                                                            int64_t full, float *acc) {
    float tile[TILE * 128] __attribute__((aligned(32)));
    for (int i = 0; i < plain->count; i++) {
        const kvp_segment *seg = &plain->segments[i];
        FOR_EACH_RUN(seg, b, seg->start, seg->end, {
            load_plain_tile(seg->v, seg->v_strides, seg->dtype, page, h, slot, n, head_dim, tile);
            for (int r = 0; r < rows; r++) {
                v8f av[128 / LANES];
                memcpy(av, acc + r * head_dim, head_dim * sizeof(float));
                row_sums(av, probs + r * full + column + (first - seg->start), tile, n, head_dim);
                memcpy(acc + r * head_dim, av, head_dim * sizeof(float));
            }
        });
        column += seg->end - seg->start;
    }
    return 1;
}

/* Softmax of one row's logits over two column ranges in place (they become exp(l - top)); returns the mass and sets
 * *top. Writes the first range's log2-domain logits to `scores` first when given. */
static inline float softmax_ranges(float *l, int64_t a0, int64_t a1, int64_t b0, int64_t b1, float *scores,
                                   float *top_out) {
    if (scores)
        for (int64_t t = a0; t < a1; t++) scores[t] = l[t] * LOG2E;
    float top = -INFINITY;
    for (int64_t t = a0; t < a1; t++) top = l[t] > top ? l[t] : top;
    for (int64_t t = b0; t < b1; t++) top = l[t] > top ? l[t] : top;
    float mass = 0.0f;
    for (int64_t t = a0; t < a1; t++) {
        l[t] = expf(l[t] - top);
        mass += l[t];
    }
    for (int64_t t = b0; t < b1; t++) {
        l[t] = expf(l[t] - top);
        mass += l[t];
    }
    *top_out = top;
    return mass;
}

/* The passes of one task, each specialised for its head dim (and bit width): chosen once per call (`pick`). Only the
 * passes are specialised, not their combination, so the library stays small and builds in a few seconds. */
typedef int (*codes_pass)(const kvp_store *, int64_t, int64_t, const float *, int, int64_t, int64_t, int64_t, float *,
                          int64_t);
typedef int (*plain_keys_pass)(const kvp_plain *, const kvp_call *, int64_t, int64_t, const float *, int, int64_t,
                               float *, int64_t);
typedef int (*plain_values_pass)(const kvp_plain *, int64_t, int64_t, const float *, int, int64_t, int64_t, float *);

typedef struct {
    codes_pass keys, values;
    plain_keys_pass plain_keys;
    plain_values_pass plain_values;
} kvp_passes;

#define CODES_PASSES(D, BITS)                                                                                      \
    static int keys_##D##_##BITS(const kvp_store *s, int64_t b, int64_t h, const float *q, int rows,               \
                                 int64_t start, int64_t end, int64_t col0, float *logits, int64_t width) {         \
        return key_logits(s, BITS, D, b, h, q, rows, start, end, col0, logits, width);                            \
    }                                                                                                              \
    static int values_##D##_##BITS(const kvp_store *s, int64_t b, int64_t h, const float *probs, int rows,         \
                                   int64_t start, int64_t end, int64_t col0, float *acc, int64_t width) {          \
        return value_sums(s, BITS, D, b, h, probs, rows, start, end, col0, width, acc);                           \
    }
#define PLAIN_PASSES(D)                                                                                            \
    static int plain_keys_##D(const kvp_plain *p, const kvp_call *c, int64_t b, int64_t h, const float *q,         \
                              int rows, int64_t column, float *logits, int64_t full) {                             \
        return plain_logits(p, c, D, b, h, q, rows, column, logits, full);                                         \
    }                                                                                                              \
    static int plain_values_##D(const kvp_plain *p, int64_t b, int64_t h, const float *probs, int rows,            \
                                int64_t column, int64_t full, float *acc) {                                        \
        return plain_sums(p, D, b, h, probs, rows, column, full, acc);                                             \
    }
CODES_PASSES(64, 8) CODES_PASSES(64, 4) CODES_PASSES(64, 2) PLAIN_PASSES(64)
CODES_PASSES(128, 8) CODES_PASSES(128, 4) CODES_PASSES(128, 2) PLAIN_PASSES(128)

#define PICK_CODES(D, BITS, FIELD) (BITS == 8 ? FIELD##_##D##_8 : BITS == 4 ? FIELD##_##D##_4 : FIELD##_##D##_2)

/* The passes for a head dim and widths; 0 when this kernel has none. */
static int pick(int64_t head_dim, int64_t kb, int64_t vb, kvp_passes *passes) {
    const int widths_ok = (kb == 8 || kb == 4 || kb == 2) && (vb == 8 || vb == 4 || vb == 2);
    if (widths_ok && head_dim == 64)
        *passes = (kvp_passes){PICK_CODES(64, kb, keys), PICK_CODES(64, vb, values), plain_keys_64, plain_values_64};
    else if (widths_ok && head_dim == 128)
        *passes = (kvp_passes){PICK_CODES(128, kb, keys), PICK_CODES(128, vb, values), plain_keys_128,
                               plain_values_128};
    else
        return 0;
    return 1;
}

/* One (row b, kv head h) task over the codes' tokens [start, end) and the plain tokens: out (R, D) and lse (R,);
 * a row with no token gets 0 and -inf. Returns 0 at a block-table entry outside the pool, else 1. */
static int attend_one(const kvp_store *s, const kvp_plain *plain, const kvp_call *c, const kvp_passes *passes,
                      int64_t b, int64_t h) {
    const int rows = (int)c->rows, head_dim = (int)c->head_dim;
    int64_t plain_length = 0;
    for (int i = 0; i < plain->count; i++) plain_length += plain->segments[i].end - plain->segments[i].start;
    const int64_t task = b * c->heads + h, full = c->width + plain_length;
    const float *q = c->q + task * rows * head_dim;
    const float *q_plain = plain->q ? plain->q + task * rows * head_dim : q;
    float *logits = c->scratch + task * rows * full, *out = c->out + task * rows * head_dim;
    float *out_plain = plain->out ? plain->out + task * rows * head_dim : out, *lse = c->lse + task * rows;
    const int64_t end = s->end ? s->end[b] : s->end_all;
    int64_t start = s->start ? s->start[b] : s->start_all;
    if (start < 0) start = 0;
    if (start > end) start = end;
    memset(out, 0, sizeof(float) * rows * head_dim);
    if (plain->out) memset(out_plain, 0, sizeof(float) * rows * head_dim);
    if (start == end && plain_length == 0) {
        for (int r = 0; r < rows; r++) lse[r] = -INFINITY;
        return 1;
    }
    if (!passes->keys(s, b, h, q, rows, start, end, c->col0, logits, full)) return 0;
    if (!passes->plain_keys(plain, c, b, h, q_plain, rows, c->width, logits, full)) return 0;
    float mass[MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        float *scores = c->scores ? c->scores + b * c->scores_strides[0] + (h * rows + r) * c->scores_strides[1]
                                        + c->score_offset + c->col0 : NULL;
        float top;
        mass[r] = softmax_ranges(logits + r * full, start - c->col0, end - c->col0, c->width, full,
                                 scores, &top);
        lse[r] = top + logf(mass[r]);
    }
    if (!passes->values(s, b, h, logits, rows, start, end, c->col0, out, full)) return 0;
    if (!passes->plain_values(plain, b, h, logits, rows, c->width, full, out_plain)) return 0;
    for (int r = 0; r < rows; r++) {
        const float inv = 1.0f / mass[r];
        for (int d = 0; d < head_dim; d++) out[r * head_dim + d] *= inv;
        if (plain->out)
            for (int d = 0; d < head_dim; d++) out_plain[r * head_dim + d] *= inv;
    }
    return 1;
}

/* Every (row, kv head) task of one decode step over one codes store and the optional plain tokens. Returns 0; -1
 * for shapes this kernel does not take (kernels/cpu_decode.py checks them first); -2 when a row's block table names
 * a page outside the pool (its outputs are then partial: the caller raises). */
int kvp_decode(const kvp_store *s, const kvp_plain *plain, const kvp_call *c) {
    kvp_passes passes;
    if (!pick(c->head_dim, s->k.bits, s->v.bits, &passes) || plain->count > MAX_PLAIN || c->rows > MAX_ROWS
        || c->head_dim / s->k.group > MAX_GROUPS || c->head_dim / s->v.group > MAX_GROUPS || s->k.group % LANES
        || s->v.group % LANES)
        return -1;
    const int64_t tasks = c->batch * c->heads;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->threads) if (c->threads > 1 && tasks > 1) reduction(|:bad)
    for (int64_t task = 0; task < tasks; task++)
        bad |= !attend_one(s, plain, c, &passes, task / c->heads, task % c->heads);
    return bad ? -2 : 0;
}
