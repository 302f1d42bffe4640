/* core/matmul.c - Y = X W^T for a batch of activation rows (see matmul.h).
 *
 * Layout (project-wide): W is [n_out][n_in] in its file type, X is
 * [n_tok][n_in] f32, Y is [n_tok][n_out] f32, Y[t][o] = sum_i W[o][i] X[t][i].
 *
 * Quantized weights. X is first converted, row by row, to the weight's
 * vec_dot type exactly as ggml's CPU backend does (Q8_0, Q8_1 or Q8_K), so
 * the integer products are the ones llama.cpp computes, and every kernel
 * adds the float terms in ggml's order (kernels.h), so the outputs are the
 * ones llama.cpp computes, bit for bit. Then:
 *  - With panels (vlm_weight_prepare, or packed on the fly for batches of
 *    PANEL_MIN_TOK tokens or more) the weight is read as panels of NR rows
 *    (kernels.h) and each panel kernel computes an NR x tokens tile of Y.
 *    Threads split the panels, so every weight row is read from memory once
 *    per token block; tokens are blocked so the quantized activations of a
 *    block stay in L2.
 *  - Otherwise the dot kernels run on ggml's block layout, one weight row at
 *    a time against every token (the row stays in L1).
 *
 * Float weights (F32 / F16 / BF16). X is rounded to the weight's float type
 * (f16 or bf16, as ggml's from_float) and laid out for the fgemm kernels
 * (fgemm.h), which add every output's terms in llamafile tinyBLAS's order at
 * every batch size: batch-invariant, and bit-identical to llama.cpp's
 * batched products. Threads split the rows in groups of FLOAT_ROWS; for
 * batches of FLOAT_SPLIT_MIN_TOK or more each thread also gets scratch that
 * lets the kernels block long rows. Only weights prepared with
 * VLM_WEIGHT_PREPARE_SGEMM take OpenBLAS cblas_sgemm instead, for batches of
 * SGEMM_MIN_TOK or more (F16 / BF16 weights through their prepared f32 copy),
 * with X rounded the same way; sgemm is only called from the calling thread,
 * never inside a pool section.
 *
 * One call (vlm_matmul, or vlm_matmul_multi for several weights sharing X)
 * runs as: 1. convert X once per distinct activation format ("act sets",
 * and "float sets" for the fgemm layout), split by tokens across the pool;
 * 2. one parallel section in which each thread takes a contiguous range of
 * all the weights' panels / row groups; 3. sgemm for the weights that opted
 * into it, from the caller's thread.
 *
 * Scratch memory is allocated per call and freed before returning, so two
 * threads may multiply concurrently with different pools. A failed scratch
 * allocation makes the call return VLM_ERR_NOMEM with Y partly written;
 * it is the caller's to report (the decoder fails its forward pass).
 */
#include "matmul.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "dtype.h"
#include "error.h"
#include "fgemm.h"
#include "kernels.h"
#include "quant.h"

enum {
    SGEMM_MIN_TOK = 16,      /* VLM_WEIGHT_PREPARE_SGEMM weights: sgemm from this many tokens */
    PANEL_MIN_TOK = 8,       /* unprepared quantized weights: pack panels on the fly from here */
    FLOAT_ROWS = 16,         /* float weights: rows per unit of work */
    FLOAT_SPLIT_MIN_TOK = 16, /* float weights: give the kernels scratch to split long rows from here */
    ACT_BLOCK_BYTES = 256 << 10,  /* quantized activations of one token block (L2-sized) */
};

/* What vlm_weight_prepare() made (w->priv). */
typedef struct matmul_priv {
    const vlm__kernel_table_t *kern; /* the ISA the panels are packed for (NULL for F32 copies) */
    bool fast;                       /* use the faster, non-ggml summation order */
    void *mem;                       /* anonymous mapping */
    size_t bytes;
    size_t panel_bytes;              /* one panel of NR rows */
    int64_t n_panels;
    bool sgemm;                      /* float weight prepared with VLM_WEIGHT_PREPARE_SGEMM */
    float *f32;                      /* [n_out][n_in] sgemm: widened copy of F16/BF16 weights, or NULL */
} matmul_priv_t;

static bool is_float_type(uint32_t t) {
    return t == VLM_DTYPE_F32 || t == VLM_DTYPE_F16 || t == VLM_DTYPE_BF16;
}

/* ggml repacks Q4_0 weights into 8-row interleaved blocks (and so sums in
 * that order, which our Q4_0 panels reproduce) only when the row count is a
 * multiple of 8; other Q4_0 weights go through its vec_dot order. */
static bool q4_0_unpacked_in_ggml(const vlm_weight_t *w) { return w->type == VLM_DTYPE_Q4_0 && w->n_out % 8 != 0; }

/* Test hook (vlm__matmul_fail_next_alloc): when > 0, the scratch
 * allocation that brings it down to 0 fails. */
static atomic_int fail_countdown;

void vlm__matmul_fail_next_alloc(int n) { atomic_store(&fail_countdown, n > 0 ? n : 0); }

/* Every per-call allocation of this file goes through here (free with
 * free()); NULL when out of memory. */
static void *scratch_alloc(size_t bytes) {
    if (atomic_load_explicit(&fail_countdown, memory_order_relaxed) > 0 &&
        atomic_fetch_sub_explicit(&fail_countdown, 1, memory_order_relaxed) == 1)
        return NULL;
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

/* ==== Loading ============================================================ */

int vlm_weight_from_tensor(vlm_weight_t *w, const vlm_gguf_tensor_t *t, vlm_error_t *err) {
    memset(w, 0, sizeof *w);
    const vlm_dtype_info_t *info = vlm_dtype_info(t->type);
    if (!info || !info->supported || t->type >= VLM_DTYPE_COUNT || !vlm__kernels_scalar.vec_dot[t->type])
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: tensor type %s is not supported for matrix products",
                             t->name, vlm_dtype_name(t->type));
    if (t->n_dims < 1 || t->n_dims > VLM_GGUF_MAX_DIMS)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: %u dimensions", t->name, t->n_dims);
    const int64_t n_in = t->ne[0];
    int64_t n_out = 1;
    for (uint32_t i = 1; i < t->n_dims; i++) {
        if (t->ne[i] <= 0 || n_out > INT64_MAX / t->ne[i])
            return vlm_error_set(err, VLM_ERR_SHAPE, "%s: bad dimension %u", t->name, i);
        n_out *= t->ne[i];
    }
    if (n_in <= 0 || n_in % info->block_size != 0)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: row length %lld is not a multiple of the %s block size %d",
                             t->name, (long long)n_in, info->name, info->block_size);
    const size_t row_bytes = vlm_dtype_row_size(t->type, n_in);
    if (row_bytes == 0 || (uint64_t)n_out > t->nbytes / row_bytes || row_bytes * (uint64_t)n_out != t->nbytes)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: %llu bytes do not hold %lld rows of %lld %s values",
                             t->name, (unsigned long long)t->nbytes, (long long)n_out, (long long)n_in, info->name);
    w->name = t->name;
    w->type = t->type;
    w->n_in = n_in;
    w->n_out = n_out;
    w->row_bytes = row_bytes;
    w->data = t->data;
    w->priv = NULL;
    return VLM_OK;
}

/* ==== Panel packing ====================================================== */

/* Bytes of one 32- or 256-element block of a panel of NR rows; the layouts
 * are described next to each tile kernel in kernels_x86.h. */
static size_t panel_block_bytes(uint32_t type, int nr) {
    switch (type) {
    case VLM_DTYPE_Q4_0: return 18 * (size_t)nr;
    case VLM_DTYPE_Q4_1: return 20 * (size_t)nr;
    case VLM_DTYPE_Q5_0: return 22 * (size_t)nr;
    case VLM_DTYPE_Q5_1: return 24 * (size_t)nr;
    case VLM_DTYPE_Q8_0: return 34 * (size_t)nr;
    case VLM_DTYPE_Q4_K: return 148 * (size_t)nr;
    case VLM_DTYPE_Q5_K: return 180 * (size_t)nr;
    case VLM_DTYPE_Q6_K: return 210 * (size_t)nr;
    default: return 0;
    }
}

static size_t panel_bytes_for(uint32_t type, int nr, int64_t n_in) {
    return panel_block_bytes(type, nr) * (size_t)(n_in / vlm__block_size(type));
}

/* Copies 4 bytes of row r into group g (each group is nr x 4 bytes), xored
 * with xr (0x80808080 turns Q8_0's signed quants into q + 128). */
static inline void put4(uint8_t *groups, int nr, int g, int r, const uint8_t *src, uint32_t xr) {
    uint32_t v;
    memcpy(&v, src, 4);
    v ^= xr;
    memcpy(groups + ((size_t)g * nr + r) * 4, &v, 4);
}

/* Q5_0/Q5_1 high bits rearranged: byte e, bit c = bit (4c + e) of qh. */
static uint32_t q5_rearrange(const uint8_t qh4[4]) {
    uint32_t qh, out = 0;
    memcpy(&qh, qh4, 4);
    for (int i = 0; i < 32; i++)
        if (qh >> i & 1u) out |= 1u << ((i % 4) * 8 + i / 4);
    return out;
}

/* Packs one block of row r: blk is the row's block in ggml layout, p the
 * panel's block (panel_block_bytes(type, nr) bytes). */
static inline void pack_block(uint32_t type, int nr, int r, const uint8_t *blk, uint8_t *p, uint32_t xr8) {
    switch (type) {
    case VLM_DTYPE_Q4_0: {
        const vlm_block_q4_0 *x = (const void *)blk;
        memcpy(p + 2 * r, &x->d, 2);
        for (int g = 0; g < 4; g++) put4(p + 2 * nr, nr, g, r, x->qs + 4 * g, 0);
        break;
    }
    case VLM_DTYPE_Q4_1: {
        const vlm_block_q4_1 *x = (const void *)blk;
        memcpy(p + 2 * r, &x->d, 2);
        memcpy(p + 2 * nr + 2 * r, &x->m, 2);
        for (int g = 0; g < 4; g++) put4(p + 4 * nr, nr, g, r, x->qs + 4 * g, 0);
        break;
    }
    case VLM_DTYPE_Q5_0: {
        const vlm_block_q5_0 *x = (const void *)blk;
        const uint32_t h = q5_rearrange(x->qh);
        memcpy(p + 2 * r, &x->d, 2);
        memcpy(p + 2 * nr + 4 * r, &h, 4);
        for (int g = 0; g < 4; g++) put4(p + 6 * nr, nr, g, r, x->qs + 4 * g, 0);
        break;
    }
    case VLM_DTYPE_Q5_1: {
        const vlm_block_q5_1 *x = (const void *)blk;
        const uint32_t h = q5_rearrange(x->qh);
        memcpy(p + 2 * r, &x->d, 2);
        memcpy(p + 2 * nr + 2 * r, &x->m, 2);
        memcpy(p + 4 * nr + 4 * r, &h, 4);
        for (int g = 0; g < 4; g++) put4(p + 8 * nr, nr, g, r, x->qs + 4 * g, 0);
        break;
    }
    case VLM_DTYPE_Q8_0: {
        const vlm_block_q8_0 *x = (const void *)blk;
        memcpy(p + 2 * r, &x->d, 2);
        for (int g = 0; g < 8; g++) put4(p + 2 * nr, nr, g, r, (const uint8_t *)x->qs + 4 * g, xr8);
        break;
    }
    case VLM_DTYPE_Q4_K:
    case VLM_DTYPE_Q5_K: {
        /* Q4_K and Q5_K share the head: d, dmin, the 12 scale bytes. */
        const vlm_block_q4_K *x4 = (const void *)blk;
        const vlm_block_q5_K *x5 = (const void *)blk;
        const uint8_t *scales = type == VLM_DTYPE_Q4_K ? x4->scales : x5->scales;
        const uint8_t *qs = type == VLM_DTYPE_Q4_K ? x4->qs : x5->qs;
        memcpy(p + 2 * r, blk, 2);              /* d */
        memcpy(p + 2 * nr + 2 * r, blk + 2, 2); /* dmin */
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            if (j < 4) {
                sc = scales[j] & 63;
                m = scales[j + 4] & 63;
            } else {
                sc = (uint8_t)((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
                m = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
            }
            p[4 * nr + j * nr + r] = sc;
            p[12 * nr + j * nr + r] = m;
        }
        uint8_t *g0 = p + 20 * nr;
        if (type == VLM_DTYPE_Q5_K) {
            for (int g = 0; g < 8; g++) put4(g0, nr, g, r, x5->qh + 4 * g, 0);
            g0 += 8 * 4 * nr;
        }
        for (int g = 0; g < 32; g++) put4(g0, nr, g, r, qs + 4 * g, 0);
        break;
    }
    case VLM_DTYPE_Q6_K: {
        const vlm_block_q6_K *x = (const void *)blk;
        memcpy(p + 2 * r, &x->d, 2);
        for (int j = 0; j < 16; j++) p[2 * nr + j * nr + r] = (uint8_t)x->scales[j];
        for (int hf = 0; hf < 2; hf++) {
            uint8_t *g0 = p + 18 * nr + (size_t)hf * 24 * 4 * nr;
            for (int g = 0; g < 8; g++) {
                put4(g0, nr, g, r, x->ql + 64 * hf + 4 * g, 0);
                put4(g0, nr, 8 + g, r, x->ql + 64 * hf + 32 + 4 * g, 0);
                put4(g0, nr, 16 + g, r, x->qh + 32 * hf + 4 * g, 0);
            }
        }
        break;
    }
    default:
        break;
    }
}

/* Packs rows [row0, row0 + nr) of w (rows past n_out are zero) into dst,
 * which holds panel_bytes_for(type, nr, n_in) bytes. */
static void panel_pack(const vlm_weight_t *w, const vlm__kernel_table_t *k, int64_t row0, uint8_t *dst) {
    const int nr = k->panel_rows;
    const int bs = vlm__block_size(w->type);
    const size_t bb = vlm__block_bytes(w->type);
    const int64_t nb = w->n_in / bs;
    const size_t pbb = panel_block_bytes(w->type, nr);
    const uint32_t xr8 = k->panel_q8_0_signed ? 0 : 0x80808080u;
    if (row0 + nr > w->n_out) memset(dst, 0, pbb * (size_t)nb);
    /* Block-major with the rows inside, so the panel is written sequentially. */
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = dst + (size_t)b * pbb;
        for (int r = 0; r < nr && row0 + r < w->n_out; r++) {
            const uint8_t *blk = (const uint8_t *)w->data + (size_t)(row0 + r) * w->row_bytes + (size_t)b * bb;
            switch (w->type) { /* constant per call: the compiler hoists it out of the loops */
            case VLM_DTYPE_Q4_0: pack_block(VLM_DTYPE_Q4_0, nr, r, blk, p, xr8); break;
            case VLM_DTYPE_Q8_0: pack_block(VLM_DTYPE_Q8_0, nr, r, blk, p, xr8); break;
            case VLM_DTYPE_Q4_K: pack_block(VLM_DTYPE_Q4_K, nr, r, blk, p, xr8); break;
            case VLM_DTYPE_Q6_K: pack_block(VLM_DTYPE_Q6_K, nr, r, blk, p, xr8); break;
            default: pack_block(w->type, nr, r, blk, p, xr8); break;
            }
        }
    }
}

/* ==== Prepare / release ================================================== */

void vlm_weight_release(vlm_weight_t *w) {
    if (!w || !w->priv) return;
    matmul_priv_t *p = w->priv;
    if (p->mem) munmap(p->mem, p->bytes);
    free(p);
    w->priv = NULL;
}

/* Anonymous memory aligned to 2 MiB and marked for transparent huge pages
 * (best effort): decoding streams every prepared weight once per token, and
 * huge pages save most of the TLB misses. Free with munmap(m, bytes). */
static void *anon_alloc(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    if (bytes < huge) {
        void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return m == MAP_FAILED ? NULL : m;
    }
    uint8_t *m = mmap(NULL, bytes + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    uint8_t *a = (uint8_t *)(((uintptr_t)m + huge - 1) & ~(uintptr_t)(huge - 1));
    if (a > m) munmap(m, (size_t)(a - m));
    const size_t tail = (size_t)(m + bytes + huge - (a + bytes));
    if (tail) munmap(a + bytes, tail);
#ifdef MADV_HUGEPAGE
    (void)madvise(a, bytes, MADV_HUGEPAGE);
#endif
    return a;
}

int vlm_weight_prepare(vlm_weight_t *w, int flags, size_t *extra_bytes, vlm_error_t *err) {
    return vlm__weight_prepare_isa(w, flags, vlm_isa_best(), extra_bytes, err);
}

int vlm__weight_prepare_isa(vlm_weight_t *w, int flags, vlm_isa_t isa, size_t *extra_bytes, vlm_error_t *err) {
    if (extra_bytes) *extra_bytes = 0;
    vlm_weight_release(w);
    const vlm__kernel_table_t *k = vlm__kernels_get(isa);
    const bool fast = (flags & VLM_WEIGHT_PREPARE_FAST_ORDER) != 0;
    const bool panels = !is_float_type(w->type) && k->panel_rows > 0 && k->panel[w->type] != NULL &&
                        (fast || !q4_0_unpacked_in_ggml(w));
    const bool sgemm = is_float_type(w->type) && (flags & VLM_WEIGHT_PREPARE_SGEMM);
    const bool widen = sgemm && w->type != VLM_DTYPE_F32;
    if (!panels && !sgemm) return VLM_OK;

    matmul_priv_t *p = calloc(1, sizeof *p);
    if (!p) return vlm_error_set(err, VLM_ERR_NOMEM, "%s: out of memory preparing the weight", w->name);
    p->sgemm = sgemm;
    if (sgemm && !widen) {
        /* F32 for sgemm: only the flag, no copy */
        w->priv = p;
        return VLM_OK;
    }
    if (panels) {
        p->kern = k;
        p->fast = fast;
        p->panel_bytes = panel_bytes_for(w->type, k->panel_rows, w->n_in);
        p->n_panels = (w->n_out + k->panel_rows - 1) / k->panel_rows;
        p->bytes = p->panel_bytes * (size_t)p->n_panels;
    } else {
        if ((uint64_t)w->n_out > SIZE_MAX / sizeof(float) / (uint64_t)w->n_in) goto fail_size;
        p->bytes = (size_t)w->n_out * (size_t)w->n_in * sizeof(float);
    }
    p->mem = anon_alloc(p->bytes);
    if (!p->mem) {
        const size_t bytes = p->bytes;
        free(p);
        return vlm_error_set(err, VLM_ERR_NOMEM, "%s: cannot map %zu bytes for the prepared weight", w->name,
                             bytes);
    }
    if (panels) {
        for (int64_t i = 0; i < p->n_panels; i++)
            panel_pack(w, k, i * k->panel_rows, (uint8_t *)p->mem + (size_t)i * p->panel_bytes);
    } else {
        p->f32 = p->mem;
        const vlm__widen_fn wf = k->widen[w->type] ? k->widen[w->type] : vlm__kernels_scalar.widen[w->type];
        for (int64_t r = 0; r < w->n_out; r++)
            wf((const uint8_t *)w->data + (size_t)r * w->row_bytes, p->f32 + (size_t)r * w->n_in, w->n_in);
    }
    w->priv = p;
    if (extra_bytes) *extra_bytes = p->bytes;
    return VLM_OK;

fail_size:
    free(p);
    return vlm_error_set(err, VLM_ERR_OVERFLOW, "%s: weight too large to widen", w->name);
}

/* ==== One call: work items and activation sets ========================== */

/* How a weight of a call is computed. */
enum {
    PATH_PANEL, /* prepared panels */
    PATH_PACK,  /* panels packed on the fly, one at a time, per thread */
    PATH_DOT,   /* dot kernels on ggml's layout */
    PATH_FLOAT, /* float weights: fgemm kernels (tinyBLAS's order) */
    PATH_SGEMM, /* float weights prepared for sgemm, large batch: cblas_sgemm after the pool sections */
};

enum { DOT_ROWS = 16, MAX_ACT_SETS = 8, MAX_FLOAT_SETS = 3 };

/* X in the fgemm layout of one float type (fgemm.h), shared by every
 * weight of the call of that type. */
typedef struct float_set {
    uint32_t type;       /* VLM_DTYPE_F32, F16 or BF16 */
    int64_t ldx;         /* row stride in floats: k_pad, plus 16 when that is a multiple of 1024 */
    float *x;            /* [n_tok][ldx] */
} float_set_t;

/* One conversion of X, shared by every weight of the call that consumes
 * the same thing. */
typedef struct act_set {
    uint32_t vtype;      /* vec_dot type */
    bool planar;         /* planar (panel kernels) or ggml blocks (dot kernels) */
    int corr_offset;     /* planar: -offset * sum(q) per sub-block, 0 = none */
    int lane_offset;     /* planar: -offset * sum(q) per 4 values (ggml-order kernels), 0 = none */
    bool need_ds;        /* planar: min-term factors */
    bool need_spair;     /* planar: Q8_K 32-sums as int16 pairs (ggml-order Q4_K/Q5_K) */
    int64_t n_corr;      /* planar: sub-blocks per row in corr */
    size_t vrow;         /* row_size(vtype, n_in) */
    uint8_t *blocks;     /* !planar: [n_tok][vrow] */
    vlm__qact_t act;     /* planar: views of the arrays below */
    int8_t *qs;          /* [n_tok][n_in] */
    float *d, *ds;       /* [n_tok][n_in/32] */
    int32_t *corr;       /* [n_tok][n_corr] */
    int32_t *lane_corr;  /* [n_tok][n_in/4] */
    int32_t *spair;      /* [n_tok][n_in/64] */
} act_set_t;

typedef struct mm_item {
    const vlm_weight_t *w;
    float *y;                        /* [n_tok][n_out] */
    int path;
    const vlm__kernel_table_t *kern; /* PANEL / PACK: the panel kernels */
    vlm__panel_fn panel;             /* PANEL / PACK: kern->panel or kern->panel_fast */
    bool fast;
    const matmul_priv_t *priv;       /* PANEL */
    vlm_vec_dot_fn dot;              /* DOT */
    vlm__fgemm_fn fgemm;             /* FLOAT */
    int act;                         /* its act_set (PANEL / PACK / DOT) or float_set (FLOAT), -1 for SGEMM */
    size_t panel_bytes;
    int64_t n_units;                 /* panels, or groups of DOT_ROWS / FLOAT_ROWS rows */
} mm_item_t;

typedef struct mm_call {
    mm_item_t *items;
    int n_items;
    act_set_t sets[MAX_ACT_SETS];
    int n_sets;
    float_set_t fsets[MAX_FLOAT_SETS];
    int n_fsets;
    const vlm__kernel_table_t *kern; /* activation converters */
    const float *x;                  /* [n_tok][n_in] */
    int64_t n_tok, n_in;
    int64_t tok_block;               /* tokens per block for prepared panels */
    int64_t n_units;                 /* sum of the items' units */
    uint8_t *tmp;                    /* [n_threads][tmp_stride]: one row of blocks (or of f16) per thread */
    size_t tmp_stride;
    uint8_t *pack;                   /* [n_threads][pack_stride]: PACK panels */
    size_t pack_stride;
    float *lanes;                    /* [n_threads][VLM__FGEMM_LANES_FLOATS] fgemm scratch, or NULL */
} mm_call_t;

/* What a panel kernel needs besides qs and d (kernels_x86.h): the fast
 * kernels take one offset correction per sub-block and float min factors;
 * the ggml-order ones a correction per 4 values or the Q8_K sum pairs. */
static void act_needs(act_set_t *want, uint32_t wt, const vlm__kernel_table_t *k, bool fast, int64_t n_in) {
    const bool q8_unsigned = !k->panel_q8_0_signed;
    want->n_corr = n_in / 32;
    if (wt == VLM_DTYPE_Q4_0) {
        want->corr_offset = 8; /* both orders: the whole block's integer sum */
    } else if (fast) {
        want->corr_offset = wt == VLM_DTYPE_Q5_0 ? 16 : wt == VLM_DTYPE_Q8_0 && q8_unsigned ? 128
                          : wt == VLM_DTYPE_Q6_K ? 32 : 0;
        if (wt == VLM_DTYPE_Q6_K) want->n_corr = n_in / 16;
        want->need_ds = wt == VLM_DTYPE_Q4_1 || wt == VLM_DTYPE_Q5_1 || wt == VLM_DTYPE_Q4_K || wt == VLM_DTYPE_Q5_K;
    } else {
        want->lane_offset = wt == VLM_DTYPE_Q5_0 ? 16 : wt == VLM_DTYPE_Q8_0 && q8_unsigned ? 128
                          : wt == VLM_DTYPE_Q6_K ? 32 : 0;
        want->need_ds = wt == VLM_DTYPE_Q4_1 || wt == VLM_DTYPE_Q5_1;
        want->need_spair = wt == VLM_DTYPE_Q4_K || wt == VLM_DTYPE_Q5_K;
    }
}

/* Returns the index of the activation set the item needs, adding it. */
static int act_set_for(mm_call_t *c, const mm_item_t *it) {
    act_set_t want = {0};
    const uint32_t wt = it->w->type;
    want.vtype = vlm_dtype_vec_dot_type(wt);
    want.planar = it->path == PATH_PANEL || it->path == PATH_PACK;
    if (want.planar) act_needs(&want, wt, it->kern, it->fast, c->n_in);
    for (int i = 0; i < c->n_sets; i++) {
        const act_set_t *s = &c->sets[i];
        if (s->vtype == want.vtype && s->planar == want.planar && s->corr_offset == want.corr_offset &&
            s->lane_offset == want.lane_offset && s->need_ds == want.need_ds &&
            s->need_spair == want.need_spair && s->n_corr == want.n_corr)
            return i;
    }
    VLM_ASSERT(c->n_sets < MAX_ACT_SETS);
    want.vrow = vlm_dtype_row_size(want.vtype, c->n_in);
    c->sets[c->n_sets] = want;
    return c->n_sets++;
}

/* Returns the index of the float set for weight type t, adding it. */
static int float_set_for(mm_call_t *c, uint32_t t) {
    for (int i = 0; i < c->n_fsets; i++)
        if (c->fsets[i].type == t) return i;
    VLM_ASSERT(c->n_fsets < MAX_FLOAT_SETS);
    const int step = VLM__FGEMM_STEP(t);
    int64_t ldx = (c->n_in + step - 1) / step * step;
    if (ldx % 1024 == 0) ldx += 16; /* rows 4 KiB apart would share L1 sets */
    c->fsets[c->n_fsets] = (float_set_t){.type = t, .ldx = ldx};
    return c->n_fsets++;
}

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Sizes the scratch of every set, the per-thread rows and panels; then
 * points everything into one allocation. Returns it (caller frees) or NULL. */
static uint8_t *call_alloc(mm_call_t *c, int nth) {
    const size_t nt = (size_t)c->n_tok, nb32 = (size_t)c->n_in / 32;
    size_t total = 0, max_vrow = 0, max_panel = 0;
    for (int i = 0; i < c->n_sets; i++) {
        const act_set_t *s = &c->sets[i];
        if (s->vrow > max_vrow) max_vrow = s->vrow;
        if (s->planar) {
            total += align64(nt * (size_t)c->n_in) + align64(nt * nb32 * sizeof(float));
            if (s->need_ds) total += align64(nt * nb32 * sizeof(float));
            if (s->corr_offset) total += align64(nt * (size_t)s->n_corr * sizeof(int32_t));
            if (s->lane_offset) total += align64(nt * (size_t)(c->n_in / 4) * sizeof(int32_t));
            if (s->need_spair) total += align64(nt * (size_t)(c->n_in / 64) * sizeof(int32_t));
        } else {
            total += align64(nt * s->vrow);
        }
    }
    for (int i = 0; i < c->n_fsets; i++) {
        total += align64(nt * (size_t)c->fsets[i].ldx * sizeof(float));
        if (c->fsets[i].type == VLM_DTYPE_F16 && (size_t)c->n_in * 2 > max_vrow) max_vrow = (size_t)c->n_in * 2;
    }
    for (int i = 0; i < c->n_items; i++)
        if (c->items[i].path == PATH_PACK && c->items[i].panel_bytes > max_panel) max_panel = c->items[i].panel_bytes;
    c->tmp_stride = align64(max_vrow);
    c->pack_stride = align64(max_panel);
    total += (size_t)nth * (c->tmp_stride + c->pack_stride);
    const bool lanes = c->n_fsets > 0 && c->n_tok >= FLOAT_SPLIT_MIN_TOK && c->kern->isa != VLM_ISA_SCALAR;
    if (lanes) total += (size_t)nth * VLM__FGEMM_LANES_FLOATS * sizeof(float);
    uint8_t *mem = scratch_alloc(total ? total : 64);
    if (!mem) return NULL;
    uint8_t *p = mem;
    for (int i = 0; i < c->n_sets; i++) {
        act_set_t *s = &c->sets[i];
        if (s->planar) {
            s->qs = (int8_t *)p;
            p += align64(nt * (size_t)c->n_in);
            s->d = (float *)p;
            p += align64(nt * nb32 * sizeof(float));
            if (s->need_ds) {
                s->ds = (float *)p;
                p += align64(nt * nb32 * sizeof(float));
            }
            if (s->corr_offset) {
                s->corr = (int32_t *)p;
                p += align64(nt * (size_t)s->n_corr * sizeof(int32_t));
            }
            if (s->lane_offset) {
                s->lane_corr = (int32_t *)p;
                p += align64(nt * (size_t)(c->n_in / 4) * sizeof(int32_t));
            }
            if (s->need_spair) {
                s->spair = (int32_t *)p;
                p += align64(nt * (size_t)(c->n_in / 64) * sizeof(int32_t));
            }
            s->act = (vlm__qact_t){.qs = s->qs, .d = s->d, .corr = s->corr, .ds = s->ds, .lane_corr = s->lane_corr,
                                   .spair = s->spair, .n_in = c->n_in, .n_corr = s->n_corr};
        } else {
            s->blocks = p;
            p += align64(nt * s->vrow);
        }
    }
    for (int i = 0; i < c->n_fsets; i++) {
        c->fsets[i].x = (float *)p;
        p += align64(nt * (size_t)c->fsets[i].ldx * sizeof(float));
    }
    c->tmp = p;
    p += (size_t)nth * c->tmp_stride;
    c->pack = p;
    p += (size_t)nth * c->pack_stride;
    c->lanes = lanes ? (float *)p : NULL;
    return mem;
}

/* ==== Activation conversion ============================================== */

static void planar_blocks(const mm_call_t *c, const act_set_t *s, const void *blocks, int64_t t);

/* Fills token t of a planar set from one row of ggml-exact Q8_0 / Q8_1 /
 * Q8_K blocks. */
static void planar_from_blocks(const mm_call_t *c, const act_set_t *s, const void *blocks, int64_t t) {
    const int64_t n_in = c->n_in;
    int8_t *qs = s->qs + t * n_in;
    planar_blocks(c, s, blocks, t);
    if (s->lane_corr) {
        int32_t *lc = s->lane_corr + t * (n_in / 4);
        for (int64_t i = 0; i < n_in / 4; i++)
            lc[i] = -s->lane_offset * (qs[4 * i] + qs[4 * i + 1] + qs[4 * i + 2] + qs[4 * i + 3]);
    }
    if (s->spair) {
        const vlm_block_q8_K *y = blocks;
        int32_t *sp = s->spair + t * (n_in / 64);
        for (int64_t i = 0; i < n_in / VLM_QK_K; i++)
            for (int l = 0; l < 4; l++) {
                const int32_t s0 = y[i].bsums[4 * l] + y[i].bsums[4 * l + 1];
                const int32_t s1 = y[i].bsums[4 * l + 2] + y[i].bsums[4 * l + 3];
                sp[4 * i + l] = (int32_t)(((uint32_t)(uint16_t)s0) | ((uint32_t)(uint16_t)s1 << 16));
            }
    }
}

/* qs, d, ds and the per-sub-block corr of token t. */
static void planar_blocks(const mm_call_t *c, const act_set_t *s, const void *blocks, int64_t t) {
    const int64_t n_in = c->n_in, nb32 = n_in / 32;
    int8_t *qs = s->qs + t * n_in;
    float *d = s->d + t * nb32;
    float *ds = s->ds ? s->ds + t * nb32 : NULL;
    int32_t *corr = s->corr ? s->corr + t * s->n_corr : NULL;
    const int off = s->corr_offset;
    if (s->vtype == VLM_DTYPE_Q8_K) {
        const vlm_block_q8_K *y = blocks;
        for (int64_t i = 0; i < n_in / VLM_QK_K; i++) {
            memcpy(qs + i * VLM_QK_K, y[i].qs, VLM_QK_K);
            for (int k = 0; k < 8; k++) {
                d[8 * i + k] = y[i].d;
                if (ds) ds[8 * i + k] = y[i].d * (float)(y[i].bsums[2 * k] + y[i].bsums[2 * k + 1]);
            }
            if (corr && s->n_corr == n_in / 16)
                for (int k = 0; k < 16; k++) corr[16 * i + k] = -off * y[i].bsums[k];
            else if (corr)
                for (int k = 0; k < 8; k++) corr[8 * i + k] = -off * (y[i].bsums[2 * k] + y[i].bsums[2 * k + 1]);
        }
    } else if (s->vtype == VLM_DTYPE_Q8_1) {
        const vlm_block_q8_1 *y = blocks;
        for (int64_t i = 0; i < nb32; i++) {
            memcpy(qs + 32 * i, y[i].qs, 32);
            d[i] = vlm_fp16_to_fp32(y[i].d);
            if (ds) ds[i] = vlm_fp16_to_fp32(y[i].s);
            if (corr) {
                int32_t sum = 0;
                for (int e = 0; e < 32; e++) sum += y[i].qs[e];
                corr[i] = -off * sum;
            }
        }
    } else {
        const vlm_block_q8_0 *y = blocks;
        for (int64_t i = 0; i < nb32; i++) {
            memcpy(qs + 32 * i, y[i].qs, 32);
            d[i] = vlm_fp16_to_fp32(y[i].d);
            if (corr) {
                int32_t sum = 0;
                for (int e = 0; e < 32; e++) sum += y[i].qs[e];
                corr[i] = -off * sum;
            }
        }
    }
}

/* ==== Float weights: activations and the scalar kernel ================== */

/* A bf16 value as f32, subnormals read as (signed) zero as dpbf16 does. */
static inline float bf16_daz(uint16_t b) {
    if (!(b & 0x7F80u)) b &= 0x8000u;
    return vlm_bf16_to_fp32(b);
}

/* One row of the fgemm activation layout (fgemm.h): x [n_in] rounded to
 * type, into dst [k_pad]; tmp holds n_in f16 values of scratch. */
static void fgemm_act_row(const vlm__kernel_table_t *k, uint32_t type, const float *x, int64_t n_in, float *dst,
                          uint16_t *tmp) {
    const int step = VLM__FGEMM_STEP(type);
    const int64_t k_pad = (n_in + step - 1) / step * step;
    if (type == VLM_DTYPE_F32) {
        memcpy(dst, x, (size_t)n_in * sizeof(float));
    } else if (type == VLM_DTYPE_F16) {
        const vlm__row_fn q = k->quantize_act[type] ? k->quantize_act[type] : vlm__kernels_scalar.quantize_act[type];
        const vlm__widen_fn wf = k->widen[type] ? k->widen[type] : vlm__kernels_scalar.widen[type];
        q(x, tmp, n_in);
        wf(tmp, dst, n_in);
    } else {
        /* each 32-chunk: its odd elements, then its even ones */
        for (int64_t i = 0; i < k_pad; i++) {
            const int64_t e = i % 32;
            const int64_t pos = i - e + (e & 1 ? e >> 1 : 16 + (e >> 1));
            dst[pos] = i < n_in ? bf16_daz(vlm_fp32_to_bf16(x[i])) : 0.0f;
        }
        return;
    }
    for (int64_t i = n_in; i < k_pad; i++) dst[i] = 0.0f;
}

/* Element i of a float weight row as f32; 0 past n_in (the zero padding). */
static inline float fgemm_weight(const vlm__fgemm_t *g, const uint8_t *row, int64_t i) {
    if (i >= g->n_in) return 0.0f;
    if (g->type == VLM_DTYPE_F32) {
        float v;
        memcpy(&v, row + 4 * i, 4);
        return v;
    }
    uint16_t b;
    memcpy(&b, row + 2 * i, 2);
    return g->type == VLM_DTYPE_F16 ? vlm_fp16_to_fp32(b) : bf16_daz(b);
}

/* tinyBLAS's order (fgemm.h) one output at a time, with fmaf (exact fused
 * multiply-add). The reference for the SIMD kernels, and the kernel of CPUs
 * without AVX2. */
void vlm__fgemm_scalar(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    const int step = VLM__FGEMM_STEP(g->type);
    const int64_t k_pad = (g->n_in + step - 1) / step * step;
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = g->w + (size_t)o * g->row_bytes;
        for (int64_t t = t0; t < t1; t++) {
            const float *x = g->x + (size_t)t * g->ldx;
            float lane[16] = {0};
            for (int64_t c = 0; c < k_pad; c += step) {
                if (g->type == VLM_DTYPE_BF16) {
                    for (int j = 0; j < 16; j++) lane[j] = fmaf(fgemm_weight(g, row, c + 2 * j + 1), x[c + j], lane[j]);
                    for (int j = 0; j < 16; j++)
                        lane[j] = fmaf(fgemm_weight(g, row, c + 2 * j), x[c + 16 + j], lane[j]);
                } else {
                    for (int j = 0; j < 16; j++) lane[j] = fmaf(fgemm_weight(g, row, c + j), x[c + j], lane[j]);
                }
            }
            float s8[8], s4[4];
            for (int j = 0; j < 8; j++) s8[j] = lane[j] + lane[j + 8];
            for (int j = 0; j < 4; j++) s4[j] = s8[j] + s8[j + 4];
            g->y[(size_t)t * g->ldy + o] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
        }
    }
}

static void act_slice(void *arg, int ith, int nth) {
    const mm_call_t *c = arg;
    long lo, hi;
    vlm_pool_range((long)c->n_tok, ith, nth, &lo, &hi);
    for (int i = 0; i < c->n_fsets; i++) {
        const float_set_t *f = &c->fsets[i];
        uint16_t *tmp = (uint16_t *)(c->tmp + (size_t)ith * c->tmp_stride);
        for (long t = lo; t < hi; t++)
            fgemm_act_row(c->kern, f->type, c->x + (size_t)t * c->n_in, c->n_in, f->x + (size_t)t * f->ldx, tmp);
    }
    for (int i = 0; i < c->n_sets; i++) {
        const act_set_t *s = &c->sets[i];
        const vlm__row_fn q = c->kern->quantize_act[s->vtype] ? c->kern->quantize_act[s->vtype]
                                                              : vlm__kernels_scalar.quantize_act[s->vtype];
        for (long t = lo; t < hi; t++) {
            const float *x = c->x + (size_t)t * c->n_in;
            if (!s->planar) {
                q(x, s->blocks + (size_t)t * s->vrow, c->n_in);
            } else {
                uint8_t *tmp = c->tmp + (size_t)ith * c->tmp_stride;
                q(x, tmp, c->n_in);
                planar_from_blocks(c, s, tmp, t);
            }
        }
    }
}

/* ==== The compute section ================================================ */

/* Rows [r0, r0 + nr) of a dot item, every token. */
static void dot_rows(const mm_call_t *c, const mm_item_t *it, int64_t r0, int64_t nr) {
    const vlm_weight_t *w = it->w;
    const act_set_t *s = &c->sets[it->act];
    for (int64_t o = r0; o < r0 + nr; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        for (int64_t t = 0; t < c->n_tok; t++) it->dot(w->n_in, it->y + t * w->n_out + o, row, s->blocks + t * s->vrow);
    }
}

/* Thread ith takes a contiguous range of the call's units (panels, or
 * groups of DOT_ROWS rows) across all items. Prepared panels run token
 * block by token block, so a block's activations stay in L2 while the
 * panels stream past; packed panels and dot rows run all tokens at once. */
static void compute_slice(void *arg, int ith, int nth) {
    const mm_call_t *c = arg;
    long lo, hi;
    vlm_pool_range((long)c->n_units, ith, nth, &lo, &hi);
    if (lo >= hi) return;
    /* pass 1: prepared panels */
    for (int64_t t0 = 0; t0 < c->n_tok; t0 += c->tok_block) {
        const int64_t nt = c->n_tok - t0 < c->tok_block ? c->n_tok - t0 : c->tok_block;
        int64_t base = 0;
        for (int i = 0; i < c->n_items && base < hi; base += c->items[i].n_units, i++) {
            const mm_item_t *it = &c->items[i];
            if (it->path != PATH_PANEL || base + it->n_units <= lo) continue;
            const int64_t u0 = lo > base ? lo - base : 0, u1 = hi - base < it->n_units ? hi - base : it->n_units;
            const int nr = it->kern->panel_rows;
            const vlm__panel_fn fn = it->panel;
            const int64_t n_out = it->w->n_out;
            const vlm__qact_t *act = &c->sets[it->act].act;
            for (int64_t u = u0; u < u1; u++) {
                const int64_t r0 = u * nr;
                const int nvalid = n_out - r0 < nr ? (int)(n_out - r0) : nr;
                fn((const uint8_t *)it->priv->mem + (size_t)u * it->panel_bytes, act, t0, nt,
                   it->y + t0 * n_out + r0, n_out, nvalid);
            }
        }
    }
    /* pass 2: everything else */
    int64_t base = 0;
    for (int i = 0; i < c->n_items && base < hi; base += c->items[i].n_units, i++) {
        const mm_item_t *it = &c->items[i];
        if (it->path == PATH_PANEL || it->path == PATH_SGEMM || base + it->n_units <= lo) continue;
        const int64_t u0 = lo > base ? lo - base : 0, u1 = hi - base < it->n_units ? hi - base : it->n_units;
        const int64_t n_out = it->w->n_out;
        if (it->path == PATH_PACK) {
            const int nr = it->kern->panel_rows;
            const vlm__panel_fn fn = it->panel;
            uint8_t *buf = c->pack + (size_t)ith * c->pack_stride;
            for (int64_t u = u0; u < u1; u++) {
                const int64_t r0 = u * nr;
                const int nvalid = n_out - r0 < nr ? (int)(n_out - r0) : nr;
                panel_pack(it->w, it->kern, r0, buf);
                fn(buf, &c->sets[it->act].act, 0, c->n_tok, it->y + r0, n_out, nvalid);
            }
        } else if (it->path == PATH_FLOAT) {
            const float_set_t *f = &c->fsets[it->act];
            const vlm__fgemm_t g = {.type = it->w->type, .w = it->w->data, .row_bytes = it->w->row_bytes,
                                    .n_in = c->n_in, .x = f->x, .ldx = f->ldx, .y = it->y, .ldy = n_out,
                                    .lanes = c->lanes ? c->lanes + (size_t)ith * VLM__FGEMM_LANES_FLOATS : NULL};
            const int64_t r0 = u0 * FLOAT_ROWS, r1 = u1 * FLOAT_ROWS < n_out ? u1 * FLOAT_ROWS : n_out;
            it->fgemm(&g, r0, r1, 0, c->n_tok);
        } else {
            const int64_t r0 = u0 * DOT_ROWS, r1 = u1 * DOT_ROWS < n_out ? u1 * DOT_ROWS : n_out;
            dot_rows(c, it, r0, r1 - r0);
        }
    }
}

/* ==== Float weights through sgemm ======================================== */

/* Only weights prepared with VLM_WEIGHT_PREPARE_SGEMM come here, so F16 /
 * BF16 ones have their f32 copy. */
typedef struct round_job {
    uint32_t type;
    const float *x;     /* [n_tok][n_in] */
    float *xr;          /* [n_tok][n_in] x rounded to type */
    int64_t n_tok, n_in;
} round_job_t;

/* X rounded to the weight's float type (what ggml's from_float does before
 * its F16/BF16 kernels), kept as f32 for sgemm. */
static void round_slice(void *arg, int ith, int nth) {
    const round_job_t *j = arg;
    long lo, hi;
    vlm_pool_range((long)j->n_tok, ith, nth, &lo, &hi);
    for (long t = lo; t < hi; t++) {
        const float *x = j->x + (size_t)t * j->n_in;
        float *o = j->xr + (size_t)t * j->n_in;
        if (j->type == VLM_DTYPE_F16)
            for (int64_t i = 0; i < j->n_in; i++) o[i] = vlm_round_fp16(x[i]);
        else
            for (int64_t i = 0; i < j->n_in; i++) o[i] = vlm_bf16_to_fp32(vlm_fp32_to_bf16(x[i]));
    }
}

/* Returns VLM_OK, or VLM_ERR_NOMEM when the rounded copy of X cannot be
 * allocated (y is then untouched). */
static int matmul_sgemm(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y) {
    const int64_t n_in = w->n_in, n_out = w->n_out;
    const matmul_priv_t *priv = w->priv;
    const float *wf = w->type == VLM_DTYPE_F32 ? w->data : priv->f32;
    float *xr = NULL;
    if (w->type != VLM_DTYPE_F32) {
        xr = scratch_alloc((size_t)n_tok * (size_t)n_in * sizeof(float));
        if (!xr) return VLM_ERR_NOMEM;
        round_job_t j = {.type = w->type, .x = x, .xr = xr, .n_tok = n_tok, .n_in = n_in};
        vlm_pool_run(pool, round_slice, &j);
    }
    /* Y = Xr W^T: M = n_tok, N = n_out, K = n_in */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_tok, (int)n_out, (int)n_in, 1.0f, xr ? xr : x,
                (int)n_in, wf, (int)n_in, 0.0f, y, (int)n_out);
    free(xr);
    return VLM_OK;
}

/* ==== Entry points ======================================================= */

/* The one implementation behind the entry points: VLM_OK, or VLM_ERR_NOMEM
 * when a scratch allocation fails (the ys are then partly written). */
static int matmul_multi(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x, int64_t n_tok,
                        float *const *ys, vlm_isa_t isa) {
    if (n_tok <= 0 || n_w <= 0) return VLM_OK;
    const vlm__kernel_table_t *k = vlm__kernels_get(isa);
    mm_item_t items_small[8];
    mm_item_t *items = n_w <= 8 ? items_small : scratch_alloc((size_t)n_w * sizeof *items);
    if (!items) return VLM_ERR_NOMEM;
    mm_call_t c = {.items = items, .n_items = n_w, .kern = k, .x = x, .n_tok = n_tok, .n_in = ws[0]->n_in};
    int rc = VLM_OK;
    for (int i = 0; i < n_w; i++) {
        const vlm_weight_t *w = ws[i];
        VLM_ASSERT(w->n_in == c.n_in);
        const matmul_priv_t *priv = w->priv;
        mm_item_t *it = &items[i];
        *it = (mm_item_t){.w = w, .y = ys[i], .act = -1};
        const bool can_pack = !is_float_type(w->type) && k->panel_rows > 0 && k->panel[w->type] &&
                              !q4_0_unpacked_in_ggml(w);
        if (is_float_type(w->type)) {
            it->path = priv && priv->sgemm && n_tok >= SGEMM_MIN_TOK ? PATH_SGEMM : PATH_FLOAT;
        } else if (priv && priv->kern && priv->kern->panel[w->type]) {
            it->path = PATH_PANEL;
            it->kern = priv->kern;
            it->priv = priv;
            it->fast = priv->fast;
        } else if (can_pack && (n_tok >= PANEL_MIN_TOK || w->type == VLM_DTYPE_Q4_0)) {
            /* Q4_0 always: only panels sum in the order of ggml's repacked Q4_0 */
            it->path = PATH_PACK;
            it->kern = k;
        } else {
            it->path = PATH_DOT;
            it->dot = k->vec_dot[w->type] ? k->vec_dot[w->type] : vlm__kernels_scalar.vec_dot[w->type];
        }
        if (it->path == PATH_PANEL || it->path == PATH_PACK) {
            it->panel = it->fast ? it->kern->panel_fast[w->type] : it->kern->panel[w->type];
            it->panel_bytes = panel_bytes_for(w->type, it->kern->panel_rows, w->n_in);
            it->n_units = (w->n_out + it->kern->panel_rows - 1) / it->kern->panel_rows;
        } else if (it->path == PATH_DOT) {
            it->n_units = (w->n_out + DOT_ROWS - 1) / DOT_ROWS;
        } else if (it->path == PATH_FLOAT) {
            it->n_units = (w->n_out + FLOAT_ROWS - 1) / FLOAT_ROWS;
            it->fgemm = k->isa == VLM_ISA_AVX512 ? vlm__fgemm_avx512
                      : k->isa == VLM_ISA_AVX2   ? vlm__fgemm_avx2
                                                 : vlm__fgemm_scalar;
        }
        if (it->path == PATH_FLOAT) it->act = float_set_for(&c, w->type);
        else if (it->path != PATH_SGEMM) it->act = act_set_for(&c, it);
        c.n_units += it->n_units;
    }
    if (c.n_units > 0) {
        uint8_t *mem = call_alloc(&c, vlm_pool_size(pool));
        if (!mem) {
            rc = VLM_ERR_NOMEM;
            goto done;
        }
        /* tokens per block: the int8 activations of a block fill ~256 KiB of L2 */
        int64_t tb = ACT_BLOCK_BYTES / c.n_in;
        c.tok_block = tb < 16 ? 16 : tb & ~(int64_t)7;
        if (n_tok * c.n_in * (c.n_sets + c.n_fsets) < (1 << 16)) act_slice(&c, 0, 1); /* small: skip a fork-join */
        else vlm_pool_run(pool, act_slice, &c);
        vlm_pool_run(pool, compute_slice, &c);
        free(mem);
    }
    /* sgemm only from this thread, outside any pool section */
    for (int i = 0; i < n_w && rc == VLM_OK; i++)
        if (items[i].path == PATH_SGEMM) rc = matmul_sgemm(pool, items[i].w, x, n_tok, items[i].y);
done:
    if (items != items_small) free(items);
    return rc;
}

int vlm_matmul_multi(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x, int64_t n_tok,
                     float *const *ys) {
    return matmul_multi(pool, ws, n_w, x, n_tok, ys, vlm_isa_best());
}

int vlm_matmul(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y) {
    return matmul_multi(pool, &w, 1, x, n_tok, &y, vlm_isa_best());
}

int vlm__matmul_isa(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y, vlm_isa_t isa) {
    return matmul_multi(pool, &w, 1, x, n_tok, &y, isa);
}

int vlm__matmul_multi_isa(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x, int64_t n_tok,
                          float *const *ys, vlm_isa_t isa) {
    return matmul_multi(pool, ws, n_w, x, n_tok, ys, isa);
}

void vlm_matmul_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y) {
    float *row = malloc((size_t)w->n_in * sizeof(float));
    VLM_ASSERT(row != NULL);
    for (int64_t o = 0; o < w->n_out; o++) {
        int rc = vlm_dtype_dequantize_row(w->type, (const uint8_t *)w->data + (size_t)o * w->row_bytes, row, w->n_in);
        VLM_ASSERT(rc == VLM_OK);
        for (int64_t t = 0; t < n_tok; t++) {
            const float *xt = x + (size_t)t * w->n_in;
            double s = 0;
            for (int64_t i = 0; i < w->n_in; i++) s += (double)row[i] * (double)xt[i];
            y[t * w->n_out + o] = (float)s;
        }
    }
    free(row);
}
