/* reader_harness.c - fic_reader_submit / wait / read / close from several threads, without Python:
 * a stress test meant to run under ThreadSanitizer.
 *
 *   gcc -O1 -g -fsanitize=thread -pthread -Icsrc tests/reader_harness.c csrc/stream.c -o /tmp/rd_tsan
 *   /tmp/rd_tsan FILE [iterations]
 *
 * FILE is created (a few MiB of a known pattern) and removed. For each backend (io_uring where the
 * kernel has it, pread with 1 and 3 threads) and for O_DIRECT and buffered opens, each iteration:
 * submits a batch (larger than the queue depth), checks that a second submit is refused, polls
 * fic_reader_busy, waits and checks every byte and status against the pattern; meanwhile a second
 * thread runs blocking fic_reader_read batches on the same reader. Every few iterations the
 * reader is closed with a batch in flight and reopened; the batch's results must still be
 * complete. Then the same with injected faults (fic_faults): short reads, EAGAIN, EINTR and slow
 * reads, which must leave every result as without them, and EIO, which may fail a request (status
 * FIC_ERR_IO, errno EIO) but no other; between batches the main thread sets the rules again
 * (refused while the other thread's read runs). Exit status 0 on success; prints one summary line
 * with the faults injected by kind. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fic.h"

#define ALIGN 4096
#define FILE_BLOCKS 1024 /* 4 MiB */
#define MAX_BATCH 40
#define QD 4

static uint8_t pattern(int64_t pos) { return (uint8_t)((pos * 2654435761u) >> 13); }

typedef struct {
    fic_read_req reqs[MAX_BATCH];
    uint8_t *arena; /* MAX_BATCH * 4 blocks */
    int n;
    uint32_t crc[MAX_BATCH];
} batch;

static uint64_t next_rand(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return *s;
}

/* n requests of 1..4 blocks at random aligned offsets; every third carries its CRC, and request 1
 * (when n > 2) a wrong one. */
static void make_batch(batch *b, uint64_t *rng, int n) {
    b->n = n;
    for (int i = 0; i < n; i++) {
        int64_t blocks = 1 + (int64_t)(next_rand(rng) % 4);
        int64_t off = (int64_t)(next_rand(rng) % (FILE_BLOCKS - blocks)) * ALIGN;
        fic_read_req *q = &b->reqs[i];
        memset(q, 0, sizeof *q);
        q->offset = off;
        q->length = blocks * ALIGN;
        q->dst = b->arena + (size_t)i * 4 * ALIGN;
        memset(q->dst, 0xEE, (size_t)q->length);
        if (i % 3 == 0 || (i == 1 && n > 2)) {
            uint8_t tmp[4 * ALIGN];
            for (int64_t k = 0; k < q->length; k++) tmp[k] = pattern(off + k);
            q->crc32c = fic_crc32c_ref(0, tmp, (size_t)q->length) ^ (i == 1 ? 1u : 0u);
            q->check_crc = 1;
        }
    }
}

/* 0 when every request came back as expected, and status (the call's) is the first failure's;
 * status_known 0 when there is no call status to check (a batch finished by close); allow_eio: a
 * request may have failed with an (injected) EIO instead. */
static int check_batch(const batch *b, int status, int status_known, int allow_eio) {
    int want_status = FIC_OK;
    for (int i = 0; i < b->n; i++) {
        const fic_read_req *q = &b->reqs[i];
        int want = (i == 1 && b->n > 2) ? FIC_ERR_CRC : FIC_OK;
        if (allow_eio && q->status == FIC_ERR_IO && q->sys_errno == EIO) want = FIC_ERR_IO;
        if (want != FIC_OK && want_status == FIC_OK) want_status = want;
        if (want == FIC_ERR_IO) continue; /* its bytes are anybody's */
        if (q->status != want || q->n_read != q->length) return fprintf(stderr, "req %d: status %d errno %d n_read %lld\n", i, q->status, q->sys_errno, (long long)q->n_read), 1;
        const uint8_t *d = q->dst;
        for (int64_t k = 0; k < q->length; k++)
            if (d[k] != pattern(q->offset + k)) return fprintf(stderr, "req %d: byte %lld wrong\n", i, (long long)k), 1;
    }
    if (status_known && status != want_status) return fprintf(stderr, "batch status %d, want %d\n", status, want_status), 1;
    return 0;
}

typedef struct {
    fic_reader *r;
    int stop;   /* atomic: set by the main thread */
    int failed; /* atomic: set by the reading thread */
    uint64_t seed;
    int allow_eio;
} reader_job;

static void *sync_reader(void *arg) {
    reader_job *j = arg;
    batch b;
    b.arena = aligned_alloc(ALIGN, (size_t)MAX_BATCH * 4 * ALIGN);
    if (b.arena == NULL) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELEASE); return NULL; }
    while (!__atomic_load_n(&j->stop, __ATOMIC_ACQUIRE)) {
        make_batch(&b, &j->seed, 1 + (int)(next_rand(&j->seed) % 12));
        if (check_batch(&b, fic_reader_read(j->r, b.reqs, b.n), 1, j->allow_eio)) {
            __atomic_store_n(&j->failed, 1, __ATOMIC_RELEASE);
            break;
        }
        usleep(200); /* give the submitting thread its turn */
    }
    free(b.arena);
    return NULL;
}

static int64_t total_hits[FIC_FAULT_KINDS + 1];

static void add_hits(const fic_reader *r) {
    for (int k = 0; k <= FIC_FAULT_KINDS; k++) total_hits[k] += fic_reader_fault_hits(r, k);
}

static int run(const char *path, int backend, int n_threads, int flags, const fic_faults *faults, int iters) {
    fic_reader *r;
    int err;
    int allow_eio = faults != NULL && faults->rules[FIC_FAULT_EIO].every > 0;
    int st = fic_reader_open(path, backend, QD, n_threads, flags, faults, &r, &err);
    if (st == FIC_ERR_UNSUPPORTED) return 0; /* no io_uring here */
    if (st != FIC_OK) return fprintf(stderr, "open: %d errno %d\n", st, err), 1;
    batch b, other;
    b.arena = aligned_alloc(ALIGN, (size_t)MAX_BATCH * 4 * ALIGN);
    other.arena = aligned_alloc(ALIGN, (size_t)MAX_BATCH * 4 * ALIGN);
    if (b.arena == NULL || other.arena == NULL) return 1;
    uint64_t rng = 88172645463325252ull ^ (uint64_t)(backend * 131 + n_threads * 7 + flags);
    reader_job job = {r, 0, 0, rng ^ 0x9E3779B97F4A7C15ull, allow_eio};
    pthread_t th;
    if (pthread_create(&th, NULL, sync_reader, &job) != 0) return 1;
    int fail = 0;
    long busy_seen = 0;
    for (int it = 0; it < iters && !fail && !__atomic_load_n(&job.failed, __ATOMIC_ACQUIRE); it++) {
        make_batch(&b, &rng, 1 + (int)(next_rand(&rng) % MAX_BATCH));
        st = fic_reader_submit(r, b.reqs, b.n);
        if (st == FIC_ERR_ARG) { /* the other thread's read holds the reader: try again */
            sched_yield();
            it--;
            continue;
        }
        if (st != FIC_OK) { fail = fprintf(stderr, "submit: %d\n", st); break; }
        make_batch(&other, &rng, 3);
        if (fic_reader_submit(r, other.reqs, other.n) != FIC_ERR_ARG) { fail = fprintf(stderr, "second submit accepted\n"); break; }
        while (fic_reader_busy(r)) {
            busy_seen++;
            sched_yield(); /* 2 cores: leave them to the I/O */
        }
        if (it % 7 == 3) {
            /* close with the batch in flight (or done but not waited for), then reopen */
            __atomic_store_n(&job.stop, 1, __ATOMIC_RELEASE);
            pthread_join(th, NULL);
            add_hits(r);
            fic_reader_close(r);
            fail |= check_batch(&b, 0, 0, allow_eio);
            if (fic_reader_open(path, backend, QD, n_threads, flags, faults, &r, &err) != FIC_OK) return 1;
            job.r = r;
            job.stop = 0;
            if (pthread_create(&th, NULL, sync_reader, &job) != 0) return 1;
            continue;
        }
        fail |= check_batch(&b, fic_reader_wait(r), 1, allow_eio);
        if (fic_reader_wait(r) != FIC_OK) fail = fprintf(stderr, "second wait not OK\n");
        if (faults != NULL) { /* the rules again: taken, or refused while the other thread reads */
            st = fic_reader_set_faults(r, faults);
            if (st != FIC_OK && st != FIC_ERR_ARG) fail = fprintf(stderr, "set_faults: %d\n", st);
        }
    }
    __atomic_store_n(&job.stop, 1, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    /* an empty batch and a submit right after close-and-reopen */
    if (fic_reader_submit(r, NULL, 0) != FIC_OK || fic_reader_wait(r) != FIC_OK) fail = fprintf(stderr, "empty batch\n");
    add_hits(r);
    fic_reader_close(r);
    free(b.arena);
    free(other.arena);
    if (busy_seen == 0 && iters > 50) fail = fprintf(stderr, "never saw a batch in flight\n");
    return fail || job.failed;
}

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: %s FILE [iterations]\n", argv[0]), 2;
    int iters = argc > 2 ? atoi(argv[2]) : 200;
    const char *path = argv[1];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return perror("create"), 2;
    uint8_t *buf = malloc((size_t)FILE_BLOCKS * ALIGN);
    if (buf == NULL) return 2;
    for (int64_t k = 0; k < (int64_t)FILE_BLOCKS * ALIGN; k++) buf[k] = pattern(k);
    if (write(fd, buf, (size_t)FILE_BLOCKS * ALIGN) != (ssize_t)FILE_BLOCKS * ALIGN) return perror("write"), 2;
    close(fd);
    free(buf);
    int fail = 0, runs = 0;
    const int backends[][2] = {{FIC_IO_URING, 1}, {FIC_IO_PREAD, 1}, {FIC_IO_PREAD, 3}};
    for (int b = 0; b < 3; b++)
        for (int flags = 0; flags <= FIC_OPEN_NO_DIRECT; flags += FIC_OPEN_NO_DIRECT) {
            int f = run(path, backends[b][0], backends[b][1], flags, NULL, iters);
            if (f) fprintf(stderr, "FAILED: backend %d threads %d flags %d\n", backends[b][0], backends[b][1], flags);
            fail |= f;
            runs++;
        }
    /* with faults: the retried kinds, then EIO among them; io_uring and 3 pread threads */
    fic_faults retried, failing;
    memset(&retried, 0, sizeof retried);
    retried.rules[FIC_FAULT_SHORT].every = 3;
    retried.rules[FIC_FAULT_EAGAIN].every = 5;
    retried.rules[FIC_FAULT_EINTR].every = 7;
    retried.rules[FIC_FAULT_SLOW].every = 11;
    retried.rules[FIC_FAULT_SLOW].arg = 20;
    retried.seed = 1;
    failing = retried;
    failing.rules[FIC_FAULT_EIO].every = 13;
    const fic_faults *fault_sets[] = {&retried, &failing};
    for (int fs = 0; fs < 2; fs++)
        for (int b = 0; b < 3; b += 2)
            for (int flags = 0; flags <= FIC_OPEN_NO_DIRECT; flags += FIC_OPEN_NO_DIRECT) {
                int f = run(path, backends[b][0], backends[b][1], flags, fault_sets[fs], iters);
                if (f) fprintf(stderr, "FAILED with faults %s: backend %d threads %d flags %d\n", fs ? "eio+retried" : "retried",
                               backends[b][0], backends[b][1], flags);
                fail |= f;
                runs++;
            }
    unlink(path);
    if (fail) return 1;
    printf("reader stress ok: %d configurations x %d iterations; faults injected: eio %lld, eagain %lld, eintr %lld, "
           "short %lld, slow %lld in %lld read operations\n", runs, iters, (long long)total_hits[FIC_FAULT_EIO],
           (long long)total_hits[FIC_FAULT_EAGAIN], (long long)total_hits[FIC_FAULT_EINTR],
           (long long)total_hits[FIC_FAULT_SHORT], (long long)total_hits[FIC_FAULT_SLOW],
           (long long)total_hits[FIC_FAULT_KINDS]);
    return 0;
}
