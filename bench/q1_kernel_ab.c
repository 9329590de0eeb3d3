/* q1_kernel_ab.c - one build's AVX2 Q1_0 matvec rows through its kernel table (dot2 where set and
 * USE_DOT2, then dot, as matvec_range), 1 thread, rows of K_W weights: 4096 * 128 weights resident in L2,
 * and one pass over 4 MiB of rows; thread CPU time, best of 15 rounds (other processes on a shared
 * machine then cost little). Build one binary per checkout and run them alternately:
 *
 *   gcc -O3 -std=gnu11 -DK_W=4096 -DUSE_DOT2=1 -I OLD/csrc -o q1_old bench/q1_kernel_ab.c -lm
 *   gcc -O3 -std=gnu11 -DK_W=4096 -DUSE_DOT2=1 -I NEW/csrc -o q1_new bench/q1_kernel_ab.c -lm
 *   for i in 1 2 3; do ./q1_old; ./q1_new; done
 *
 * The checksum (sum of the first 64 outputs) must be the same for both builds. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <math.h>
#include <sys/mman.h>
#include "kernels_avx2.c"
void kern_deq_range_ref(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out) {(void)fmt;(void)row;(void)b0;(void)b1;(void)out;}
void fixed_add_ref(const float *c, int64_t *acc, int64_t n) {(void)c;(void)acc;(void)n;}
static double now(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static void mv(const job_t *j, const uint8_t *w, int64_t r0, int64_t r1, float *y) {
    const fic_fmt_kernels *kf = &fic_kernels_avx2.fmt[FIC_Q1_0];
    int64_t r = r0;
    if (kf->dot2 && USE_DOT2) for (; r + 2 <= r1; r += 2) kf->dot2(j, w + r * j->row_bytes, y + r);
    for (; r < r1; r++) y[r] = kf->dot(j, w + r * j->row_bytes, NULL);
}
int main(void) {
    const int64_t k = K_W, rb = k / 128 * 18, rows_l2 = 4096 * 128 / K_W, rows_dram = (4LL << 20) / rb;
    uint8_t *w = mmap(NULL, rows_dram * rb, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    madvise(w, rows_dram * rb, MADV_HUGEPAGE);
    srand(1);
    for (int64_t i = 0; i < rows_dram * rb; i++) w[i] = rand();
    for (int64_t r = 0; r < rows_dram; r++) for (int64_t b = 0; b < k / 128; b++) ((block_q1_0 *)(w + r * rb))[b].d = 0x2c00 + (rand() & 0x3ff);
    float *x = malloc(k * 4); for (int i = 0; i < k; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    /* xq: 2 bytes per weight since the two-lane layout (1 before) */
    int8_t *xq = aligned_alloc(64, 2 * k); float *a8 = aligned_alloc(64, k / 4), *c8 = aligned_alloc(64, k / 4);
    kern_quantize_x_avx2(x, k, xq, a8, c8);
    job_t j; memset(&j, 0, sizeof j); j.k = k; j.row_bytes = rb; j.xq = xq; j.xscale16 = a8; j.xcorr16 = c8;
    float *y = malloc(rows_dram * 4); double cs = 0;
    double l2 = 0, dr = 0;
    for (int rep = 0; rep < 15; rep++) {
        double t0 = now(); int n = 0;
        while (now() - t0 < 0.05) { mv(&j, w, 0, rows_l2, y); n++; }
        double g = (double)n * rows_l2 * rb / (now() - t0) / 1e9; if (g > l2) l2 = g;
        if (rep % 5 == 0) { t0 = now(); mv(&j, w, 0, rows_dram, y); g = (double)rows_dram * rb / (now() - t0) / 1e9; if (g > dr) dr = g; }
    }
    for (int64_t r = 0; r < 64; r++) cs += y[r];
    printf("L2 %.2f GB/s DRAM %.2f GB/s (checksum %.4f)\n", l2, dr, cs);
    return 0;
}
