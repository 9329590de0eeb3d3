/* pool.h - internal: the thread pool's parallel-for and the CPU's features, used by the kernels. */
#ifndef FIC_POOL_H
#define FIC_POOL_H

#include <stdint.h>

#include "fic.h"

/* Work on items [begin, end); tid in [0, n_threads) identifies the thread (0 = the caller),
 * so a kernel can index per-thread scratch. */
typedef void (*fic_range_fn)(void *ctx, int64_t begin, int64_t end, int tid);

/* Runs fn over [0, n) in chunks of `chunk` items (the last may be shorter), spread over the
 * pool's threads; returns when every chunk is done. pool may be NULL (runs inline). Chunks are
 * handed out in order from a shared counter, so a slow thread does not hold the others back, and
 * completion counts finished chunks, not threads: a worker that is descheduled (a busy machine)
 * or wakes late finds nothing left, and never runs fn once this call has returned. Which thread
 * runs a chunk is not fixed: fn must not assume tid k gets the k-th 1/n of the items.
 * If another thread is already using the pool, this call runs inline on its own thread. */
void fic_parallel_for(fic_pool *pool, int64_t n, int64_t chunk, fic_range_fn fn, void *ctx);

/* The CPU's features, detected once (pthread_once) and read-only afterwards; every flag implies
 * the ones before it on its line (avx512_q1: VNNI, BITALG, VBMI and GFNI; see kernels_avx512.c). */
typedef struct {
    int avx2;                            /* AVX2 + FMA + F16C */
    int avx512, avx512_vnni, avx512_q1;  /* AVX-512 F/BW/VL; + VNNI; + VNNI, BITALG, VBMI, GFNI */
    int amx_int8;                        /* + AMX-TILE and AMX-INT8, the OS's tile state granted */
    int neon;                            /* AArch64 */
} fic_cpu_features;
const fic_cpu_features *fic_cpu_features_get(void);

#endif /* FIC_POOL_H */
