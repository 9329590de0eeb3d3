/* kernels.c - the kernels' shared generic code: which table runs an implementation on this CPU
 * (fic_kernels_for), activation preparation (prep_x), row chunks and the accum_rows range.
 * Per-architecture code lives in kernels_scalar.c, kernels_avx2.c, kernels_avx512.c (with
 * kernels_amx.c) and kernels_neon.c; this file reaches it only through their tables and the x86
 * quantizers. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

/* The table of impl on this CPU. Choice: const tables per architecture, picked by this switch over
 * the CPU features pool.c resolves once (pthread_once) and never changes; the pick is per call,
 * not per row. Not stored in the pool: kernels also run with no pool (pool NULL), and the
 * workspace is the caller's memory, so neither can carry it. */
const fic_kernels *fic_kernels_for(int impl) {
    if (!fic_impl_available(impl)) return NULL;
    switch (impl) {
    case FIC_IMPL_REF: return &fic_kernels_scalar;
#if defined(FIC_X86)
    case FIC_IMPL_AVX2: return &fic_kernels_avx2;
    case FIC_IMPL_AVX512: {
        const fic_cpu_features *cpu = fic_cpu_features_get();
        return cpu->amx_int8 ? &fic_kernels_avx512_amx
               : cpu->avx512_q1 ? &fic_kernels_avx512_q1
               : cpu->avx512_vnni ? &fic_kernels_avx512_vnni
                                  : &fic_kernels_avx512;
    }
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: return &fic_kernels_neon;
#endif
    default: return NULL;
    }
}

/* matvec quantizes x to int8 (q8 blocks of 32, once per call) where measurement said it pays:
 * Q1_0 on AVX-512 and AVX2 (the float paths were bound by mask moves, ~5 GB/s a core, and by
 * bit expansion, ~3 GB/s; int8 is 3x and 1.6x faster; stored as bit planes where the CPU has
 * VNNI, BITALG and VBMI, 22 instead of 17 GB/s a core) and Q4_0/Q4_1 on AVX-512 with VNNI
 * (the float path ran at 16 GB/s a core, under half the 2-thread bandwidth; VNNI doubles it).
 * The added error is bounded and measured in tests/test_kernels.py and bench/RESULTS.md. */

/* Weights per sum of x in XP_SUMS: the block, or a Q4_K sub-block. */
static int64_t xsum_width(const job_t *j) { return j->fmt == FIC_Q4_K ? 32 : j->bw; }

static int prep_x_mode(const job_t *j) {
    const int mode = j->kf->xprep;
    if (mode == XP_Q1_PLANES) {
        /* Planes take 4 blocks per step, a last partial group padded: they pay when the groups
         * are at least 80% full (measured, 1 thread, L2: 4, 7, 8, 10 blocks faster than psadbw,
         * 6 and 9 even, 1-3 and 5 slower, e.g. 12 vs 14 GB/s at 5). */
        const int64_t nb = j->k / QK1_0, ng = (nb + 3) / 4;
        return 5 * nb >= 16 * ng ? mode : j->kf->xprep_small;
    }
    if (mode == XP_Q4_VNNI && (j->exact || j->k < 64)) return j->kf->xprep_small; /* no whole pair of blocks */
    if (mode == XP_Q8 && (j->exact || j->k % 32 != 0)) return j->kf->xprep_small;
    return mode;
}

int x_prepared_as_table(const job_t *j) { return prep_x_mode(j) == j->kf->xprep; }

/* Bytes prep_x needs for job j (0: nothing to prepare); a multiple of 64. */
size_t prep_x_bytes(const job_t *j) {
    size_t n;
    switch (prep_x_mode(j)) {
    case XP_SUMS: n = (size_t)(j->k / xsum_width(j)) * sizeof(float); break;
    case XP_Q1_AVX2: n = (size_t)j->k * 2 + (size_t)j->k / 2; break; /* 2k int8 + 2 x k/16 floats */
    case XP_Q1_AVX512: n = (size_t)j->k * 2; break; /* k int8 + k/4 floats */
    case XP_Q1_PLANES: /* 512 bytes + 32 floats per group of 4 blocks, k bytes of scratch */
        n = (size_t)((j->k / QK1_0 + 3) / 4) * (512 + 32 * sizeof(float)) + (size_t)j->k;
        break;
    case XP_Q4_VNNI: n = (size_t)kern_q4_quad_weights(j->k) * 3; break; /* int8 + 2 floats per 4 weights */
    case XP_Q8: n = (size_t)QX_ROW_BYTES(j->k); break; /* k int8 + 2 x k/32 floats */
    default: n = 0;
    }
    return (n + 63) / 64 * 64;
}

/* Prepares j->x into mem (prep_x_bytes(j) bytes, 64-byte aligned) and points j's activation
 * fields (xsum, xq, xu, xscale16, xcorr16, q4_int8) at it. */
void prep_x(job_t *j, void *mem) {
    j->xsum = NULL;
    j->xq = NULL;
    j->xu = NULL;
    j->xscale16 = j->xcorr16 = NULL;
    j->q4_int8 = 0;
    j->q1_planes = 0;
    switch (prep_x_mode(j)) {
    case XP_SUMS: {
        float *s = mem;
        const int64_t sw = xsum_width(j);
        for (int64_t b = 0; b < j->k / sw; b++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < sw; i++) acc += j->x[b * sw + i];
            s[b] = acc;
        }
        j->xsum = s;
        return;
    }
#if defined(FIC_X86)
    case XP_Q1_AVX512: {
        float *sc = (float *)((uint8_t *)mem + j->k), *corr = sc + j->k / 8;
        kern_quantize_x_q1_avx512(j->x, j->k, (uint8_t *)mem, sc, corr);
        j->xu = (const uint8_t *)mem;
        j->xscale16 = sc;
        j->xcorr16 = corr;
        return;
    }
    case XP_Q1_PLANES: {
        const int64_t ng = (j->k / QK1_0 + 3) / 4;
        uint8_t *pl = mem;
        float *a16 = (float *)(pl + 512 * ng), *c16 = a16 + 16 * ng;
        kern_quantize_x_q1_planes(j->x, j->k, pl, a16, c16, (int8_t *)(c16 + 16 * ng));
        j->xu = pl;
        j->xscale16 = a16;
        j->xcorr16 = c16;
        j->q1_planes = 1;
        return;
    }
    case XP_Q1_AVX2: {
        float *a8 = (float *)((uint8_t *)mem + 2 * j->k), *c8 = a8 + j->k / 16;
        kern_quantize_x_avx2(j->x, j->k, (int8_t *)mem, a8, c8);
        j->xq = (const int8_t *)mem;
        j->xscale16 = a8;
        j->xcorr16 = c8;
        return;
    }
    case XP_Q8: {
        fic_qdot_quantize_avx2(j->x, j->k, mem);
        j->xq = (const int8_t *)mem;
        j->xscale16 = (const float *)((uint8_t *)mem + j->k);
        j->xcorr16 = j->xscale16 + j->k / QX_BLOCK;
        return;
    }
    case XP_Q4_VNNI: {
        int8_t *xq = mem;
        const int64_t kq = kern_q4_quad_weights(j->k);
        float *sc = (float *)(xq + kq), *corr = sc + kq / 4;
        kern_quantize_x_quads_avx512(j->x, j->k, j->fmt == FIC_Q4_0, xq, sc, corr);
        j->xq = xq;
        j->xscale16 = sc;
        j->xcorr16 = corr;
        j->q4_int8 = 1;
        return;
    }
#endif
    default:
        return;
    }
}


/* Rows per chunk: chunks of at least 1 MiB where the matrix has them (each chunk is a fresh memory
 * stream that must ramp up), up to four a thread (load balance), and always a whole number of
 * chunks a thread: three 1 MiB chunks and a short one on 2 threads (Q1_0's phase 1 of 6,144
 * neurons) left one thread two full chunks while the other had one and the short one. */
int64_t row_chunk(fic_pool *pool, int64_t m, int64_t row_bytes) {
    const int64_t n_threads = fic_pool_threads(pool);
    const int64_t min_rows = ((int64_t)1 << 20) / row_bytes + 1;
    int64_t n_chunks = m / min_rows / n_threads * n_threads;
    if (n_chunks < n_threads) n_chunks = n_threads;
    if (n_chunks > 4 * n_threads) n_chunks = 4 * n_threads;
    return (m + n_chunks - 1) / n_chunks;
}


/* Rows outer, this thread's columns inner: y's range stays in L1/L2 while the rows stream
 * past; each row piece is prefetched a few rows ahead since the hardware prefetcher does not
 * follow one piece per row. A format's own accum kernel (Q1_0 on AVX-512) replaces the loop. */
void accum_range(void *ctx, int64_t b0, int64_t b1, int tid) {
    const job_t *j = ctx;
    (void)tid;
    if (j->kf->accum) {
        j->kf->accum(j, b0, b1);
        return;
    }
    float buf[SEG_FLOATS];
    const int64_t seg_blocks = SEG_FLOATS / j->bw, piece = (b1 - b0) * j->bb;
    for (int64_t i = 0; i < j->m; i++) {
        if (i + ACCUM_PF_ROWS < j->m) {
            const uint8_t *ahead = j->w + (i + ACCUM_PF_ROWS) * j->row_bytes + b0 * j->bb;
            for (int64_t off = 0; off < piece; off += 64) FIC_PREFETCH(ahead + off);
        }
        if (j->a[i] == 0.0f) continue; /* pruned neuron: its row need not be read */
        const uint8_t *row = j->w + i * j->row_bytes;
        for (int64_t s = b0; s < b1; s += seg_blocks) {
            int64_t e = b1 - s < seg_blocks ? b1 : s + seg_blocks;
            float *y = j->y + s * j->bw;
            if (j->fmt == FIC_F32) {
                axpy(j, j->a[i], (const float *)row + s, y, (e - s) * j->bw);
            } else if (j->kf->axpy_blocks && j->kf->axpy_blocks(row, s, e, j->a[i], y)) {
                continue;
            } else {
                deq_range(j, row, s, e, buf);
                axpy(j, j->a[i], buf, y, (e - s) * j->bw);
            }
        }
    }
}
