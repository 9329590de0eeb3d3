/* read_prefetch.c - one thread's read rate from DRAM with each software prefetch hint and distance,
 * beside some compute per cache line (a stand-in for a kernel's work per byte).
 *
 *   gcc -O2 -march=native -mno-amx-tile -o /tmp/read_prefetch bench/read_prefetch.c
 *   /tmp/read_prefetch [GiB]           (default 1; x86-64 with AVX-512 VNNI only)
 *
 * A buffer on transparent huge pages (as fic's weights) is summed 256 bytes a step with four
 * 64-byte loads; `work` chained vpdpbusd per load stand for the kernel's operations; the prefetch
 * (none, prefetcht0, prefetcht1, prefetchnta) is issued for the lines `dist` bytes ahead, one per
 * line. Used to choose matvec's and the r32 kernel's prefetch distances (bench/RESULTS.md, "Long
 * rows one at a time"). Prints GB/s per variant, two rounds. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { PF_NONE, PF_T0, PF_T1, PF_NTA };

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline void prefetch_line(const uint8_t *p, int pf) {
    if (pf == PF_T0) _mm_prefetch((const char *)p, _MM_HINT_T0);
    else if (pf == PF_T1) _mm_prefetch((const char *)p, _MM_HINT_T1);
    else if (pf == PF_NTA) _mm_prefetch((const char *)p, _MM_HINT_NTA);
}

/* The buffer's bytes summed as int32 lanes (the result keeps the loads alive). */
static int32_t sweep(const uint8_t *buf, size_t n_bytes, int pf, size_t dist, int work) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const __m512i one = _mm512_set1_epi8(1);
    for (size_t i = 0; i < n_bytes; i += 256) {
        if (pf != PF_NONE)
            for (size_t o = 0; o < 256; o += 64) prefetch_line(buf + i + dist + o, pf);
        __m512i v0 = _mm512_load_si512(buf + i), v1 = _mm512_load_si512(buf + i + 64),
                v2 = _mm512_load_si512(buf + i + 128), v3 = _mm512_load_si512(buf + i + 192);
        for (int w = 0; w < work; w++) {
            v0 = _mm512_dpbusd_epi32(v0, v0, one);
            v1 = _mm512_dpbusd_epi32(v1, v1, one);
            v2 = _mm512_dpbusd_epi32(v2, v2, one);
            v3 = _mm512_dpbusd_epi32(v3, v3, one);
        }
        a0 = _mm512_add_epi32(a0, v0);
        a1 = _mm512_add_epi32(a1, v1);
        a2 = _mm512_add_epi32(a2, v2);
        a3 = _mm512_add_epi32(a3, v3);
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

int main(int argc, char **argv) {
    const size_t n_bytes = (size_t)(argc > 1 ? atoi(argv[1]) : 1) << 30, pad = 1 << 16, align = (size_t)2 << 20;
    if (n_bytes == 0) {
        fprintf(stderr, "usage: read_prefetch [GiB]\n");
        return 2;
    }
    uint8_t *buf = aligned_alloc(align, (n_bytes + pad + align - 1) / align * align);
    if (buf == NULL) {
        fprintf(stderr, "read_prefetch: out of memory\n");
        return 1;
    }
    madvise(buf, n_bytes + pad, MADV_HUGEPAGE);
    memset(buf, 1, n_bytes + pad); /* every page faulted in before timing */
    static const char *const names[] = {"none", "t0", "t1", "nta"};
    static const int works[] = {0, 2, 4, 8};
    static const size_t dists[] = {1024, 4096};
    volatile int32_t sink = 0;
    for (int round = 0; round < 2; round++)
        for (size_t wi = 0; wi < sizeof works / sizeof works[0]; wi++)
            for (int pf = PF_NONE; pf <= PF_NTA; pf++)
                for (size_t di = 0; di < (pf == PF_NONE ? 1 : 2); di++) {
                    const double t0 = now_s();
                    sink += sweep(buf, n_bytes, pf, dists[di], works[wi]);
                    const double s = now_s() - t0;
                    printf("round %d work %d prefetch %-4s dist %5zu: %.1f GB/s\n", round, works[wi], names[pf],
                           pf == PF_NONE ? (size_t)0 : dists[di], (double)n_bytes / s / 1e9);
                }
    free(buf);
    return 0; /* the volatile sink keeps the sums from being optimised away */
}
