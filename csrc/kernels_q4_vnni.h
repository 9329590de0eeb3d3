/* kernels_q4_vnni.h - Q4_0/Q4_1 with int8 x on AVX-512 VNNI: the quad kernel and every path that
 * inlines it (matvec's row pairs, FFN phase 1 rows, phase 2 down columns, summed or fixed point).
 *
 * A template, included twice by kernels_avx512.c (no include guard): once as the VNNI table's code
 * (Q4V_VBMI 0, names ending _vnni) and once for CPUs that also have VBMI and GFNI (Q4V_VBMI 1, _vbmi;
 * the tables of kernels_avx512.c's Q1 tier). The includer defines Q4V_VBMI, Q4V_TGT (the target
 * attribute) and Q4V(name); both copies give the same bits. Measured (bench/RESULTS.md), the VBMI
 * copy was 1.03-1.08x in L2 and 1.05x on a SmolLM2-shaped FFN. */

/* Q4_0/Q4_1 x int8 activations with VNNI, four blocks (128 weights) per step. The four blocks'
 * 16 nibble bytes fill one zmm (a block per 128-bit lane); its low nibbles (each block's weights
 * 0-15) and high nibbles (16-31) take one vpdpbusd each against x, quantized once per call into
 * the matching "quad layout" (per quad of blocks 64 bytes of low-half x, then 64 of high-half x),
 * so int32 lanes 4b..4b+3 hold block b's sums. One vpermw picks the four blocks' d (and m) words
 * out of one 64-byte load. Per lane: p = isum * dx + corr (corr = -8 dx sum xq for Q4_0's offset),
 * y += d * p; Q4_1 adds m * (dx sum xq) into a second accumulator. A last partial quad loads only
 * its blocks (masked) against x padded with zeros. About 14 operations per 128 weights, 2 of them
 * port 5 only (the pair kernel before it: 14 per 64, 7 on port 5; bench/RESULTS.md). With VBMI and
 * GFNI a whole quad's nibbles come from two loads and one byte permute (not four loads and three
 * inserts) and the high nibbles from one affine byte operation (not a shift and a mask). */
Q4V_TGT static ALWAYS_INLINE void Q4V(q4_quad)(const uint8_t *g, int64_t stride, int is1, int nblk,
                                                    __m512i xlo, __m512i xhi, __m512 sc, __m512 corr, __m512 *acc,
                                                    __m512 *accm) {
    const int64_t off = is1 ? 4 : 2;
    const __m512i nib = _mm512_set1_epi8(15);
    /* word lanes 0-15: d of block lane / 4; 16-31: the word after it (Q4_1's m) */
    static const uint16_t idx_q4_0[32] __attribute__((aligned(64))) = {0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27};
    static const uint16_t idx_q4_1[32] __attribute__((aligned(64))) = {
        0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30, 1, 1, 1, 1, 11, 11, 11, 11, 21, 21, 21, 21, 31, 31, 31, 31};
    const __m512i idx = _mm512_load_si512((const void *)(is1 ? idx_q4_1 : idx_q4_0));
    __m512i v, raw;
#if Q4V_VBMI
    if (nblk == 4) {
        raw = _mm512_loadu_si512((const void *)g);
        const __m512i tail = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(g + 4 * stride - 16)));
        v = _mm512_permutex2var_epi8(raw, _mm512_load_si512((const void *)q4_nibble_idx[is1]), tail);
    } else
#endif
    {
        v = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)(g + off)));
        if (nblk > 1) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(g + stride + off)), 1);
        if (nblk > 2) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(g + 2 * stride + off)), 2);
        if (nblk > 3) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(g + 3 * stride + off)), 3);
        /* d3 (and m3) lie within the first 64 bytes; a row's last 1-3 blocks: nothing read past
         * them, absent blocks' d and m are 0 */
        raw = nblk == 4 ? _mm512_loadu_si512((const void *)g)
                        : _mm512_maskz_loadu_epi8(((__mmask64)1 << (nblk * stride)) - 1, g);
    }
#if Q4V_VBMI
    /* each byte >> 4: the affine map whose matrix row for result bit i (byte 7 - i) picks bit i + 4 */
    const __m512i hi = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
#endif
    const __m512i lo = _mm512_and_si512(v, nib);
    const __m512i isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
    const __m512i dm = _mm512_permutexvar_epi16(idx, raw);
    const __m512 dv = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    if (is1) {
        *acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), sc), dv, *acc);
        *accm = _mm512_fmadd_ps(corr, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1)), *accm);
    } else {
        *acc = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, corr), dv, *acc);
    }
}

/* Quad q of NR rows: x's quad loaded once for all of them. */
Q4V_TGT static ALWAYS_INLINE void Q4V(q4_quads)(const job_t *j, const uint8_t *row, int64_t rb, const int nr,
                                                     int64_t q, int nblk, const int is1, __m512 *acc, __m512 *accm) {
    const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
    const __m512 sc = _mm512_loadu_ps(j->xscale16 + 16 * q), corr = _mm512_loadu_ps(j->xcorr16 + 16 * q);
    const __m512i xlo = _mm512_loadu_si512((const void *)(j->xq + 128 * q)),
                  xhi = _mm512_loadu_si512((const void *)(j->xq + 128 * q + 64));
    for (int i = 0; i < nr; i++)
        Q4V(q4_quad)(row + i * rb + 4 * q * stride, stride, is1, nblk, xlo, xhi, sc, corr, &acc[i], &accm[i]);
}

Q4V_TGT static ALWAYS_INLINE void Q4V(q4_rows_fmt)(const job_t *j, const uint8_t *row, int64_t rb, const int nr,
                                                        float *y, const int is1) {
    const int64_t nb = j->k / 32, n_full = nb / 4;
    __m512 acc[P2_ROWS], accm[P2_ROWS];
    for (int i = 0; i < nr; i++) acc[i] = accm[i] = _mm512_setzero_ps();
    const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
    if (nr == 1 && j->stream_pf) {
        for (int64_t q = 0; q < n_full; q++) {
            stream_prefetch(row + 4 * q * stride, 4 * (int)stride);
            Q4V(q4_quads)(j, row, rb, 1, q, 4, is1, acc, accm);
        }
    } else {
        for (int64_t q = 0; q < n_full; q++) Q4V(q4_quads)(j, row, rb, nr, q, 4, is1, acc, accm);
    }
    if (nb % 4) Q4V(q4_quads)(j, row, rb, nr, n_full, (int)(nb % 4), is1, acc, accm);
    for (int i = 0; i < nr; i++) y[i] = _mm512_reduce_add_ps(is1 ? _mm512_add_ps(acc[i], accm[i]) : acc[i]);
}

/* NR (at most P2_ROWS) Q4 rows rb bytes apart against x prepared in the quad layout, into
 * y[0..NR): the rows share the scale loads and overlap their dependency chains. Each row's
 * result is the same bits whatever NR (its own accumulators, the same operations in order).
 * One copy per format (is1 a constant in each), whole quads apart from a row's last. */
Q4V_TGT static ALWAYS_INLINE void Q4V(q4_rows)(const job_t *j, const uint8_t *row, int64_t rb, const int nr,
                                                    float *y) {
    if (j->fmt == FIC_Q4_1)
        Q4V(q4_rows_fmt)(j, row, rb, nr, y, 1);
    else
        Q4V(q4_rows_fmt)(j, row, rb, nr, y, 0);
}

Q4V_TGT static ALWAYS_INLINE float Q4V(q4_row)(const job_t *j, const uint8_t *row) {
    float y;
    Q4V(q4_rows)(j, row, 0, 1, &y);
    return y;
}

/* Two consecutive Q4 rows (matvec's pairs, rows of at most PAIR_MAX_K weights: matvec.c); float x
 * where it was not prepared for VNNI. */
Q4V_TGT static void Q4V(dot2_q4)(const job_t *j, const uint8_t *row0, float *y) {
    if (j->q4_int8) {
        Q4V(q4_rows)(j, row0, j->row_bytes, 2, y);
    } else {
        y[0] = j->kf->dot(j, row0, j->x);
        y[1] = j->kf->dot(j, row0 + j->row_bytes, j->x);
    }
}

/* Phase 1 rows [r0, r1) of one matrix (gate or up: rows at base, rb bytes each) of expert e,
 * Q4 on VNNI: out[r - r0] = row r . x. */
Q4V_TGT static void Q4V(p1_rows_q4)(const job_t *j, const uint8_t *base, int64_t rb, int64_t r0, int64_t r1,
                                           int64_t r_pf, float *out) {
    int64_t r = r0;
    for (; j->k <= Q4_PAIR_MAX_K && r + 2 <= r1; r += 2) {
        const uint8_t *row = base + r * rb;
        if (r < r_pf) p1_prefetch(row, rb);
        if (r + 1 < r_pf) p1_prefetch(row + rb, rb);
        Q4V(q4_rows)(j, row, rb, 2, out + (r - r0));
    }
    for (; r < r1; r++) {
        if (r < r_pf && !j->stream_pf) p1_prefetch(base + r * rb, rb);
        out[r - r0] = Q4V(q4_row)(j, base + r * rb);
    }
}

/* Phase 2, columns, one block of NR output rows starting at r: for each expert, its NR row
 * pieces against h_e prepared, into NR accumulators (one reduction per output row over all
 * experts). Q4 on VNNI; experts whose h_e is not in the quad layout (n_e < 64) take dot_row. */
Q4V_TGT static inline __attribute__((always_inline)) void Q4V(down_cols_q4_block)(const ffn_t *f, int64_t r,
                                                                                    int nr, int64_t r_end,
                                                                                    const int is1) {
    __m512 acc[P2_ROWS], accm[P2_ROWS];
    float extra[P2_ROWS];
    for (int i = 0; i < nr; i++) {
        acc[i] = accm[i] = _mm512_setzero_ps();
        extra[i] = 0.0f;
    }
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        const uint8_t *w = down_part(f, e) + r * rb;
        p2_prefetch(w, rb, r, nr, r_end);
        if (!j->q4_int8) {
            for (int i = 0; i < nr; i++) extra[i] += dot_row(j, w + i * rb, j->x);
            continue;
        }
        const int64_t nb = j->k / 32, n_full = nb / 4;
        for (int64_t q = 0; q < n_full; q++) Q4V(q4_quads)(j, w, rb, nr, q, 4, is1, acc, accm);
        if (nb % 4) Q4V(q4_quads)(j, w, rb, nr, n_full, (int)(nb % 4), is1, acc, accm);
    }
    for (int i = 0; i < nr; i++) f->y[r + i] += _mm512_reduce_add_ps(_mm512_add_ps(acc[i], accm[i])) + extra[i];
}

/* One copy of the row loop per format, as q4_rows. */
Q4V_TGT static ALWAYS_INLINE void Q4V(down_cols_q4_sum_fmt)(const ffn_t *f, int64_t r0, int64_t r1, const int is1) {
    int64_t r = r0;
    for (; r + P2_ROWS <= r1; r += P2_ROWS) Q4V(down_cols_q4_block)(f, r, P2_ROWS, r1, is1);
    for (; r < r1; r++) Q4V(down_cols_q4_block)(f, r, 1, r1, is1);
}

Q4V_TGT static void Q4V(down_cols_q4_sum)(const ffn_t *f, int64_t r0, int64_t r1) {
    if (f->down_fmt == FIC_Q4_1)
        Q4V(down_cols_q4_sum_fmt)(f, r0, r1, 1);
    else
        Q4V(down_cols_q4_sum_fmt)(f, r0, r1, 0);
}

/* FFN phase 1 rows of Q4 with x in the quad layout (0 when x was not prepared that way). */
Q4V_TGT static int Q4V(rows_q4)(const job_t *j, const uint8_t *base, int64_t rb, int64_t r0, int64_t r1,
                                       int64_t r_pf, float *out) {
    if (!j->q4_int8) return 0;
    Q4V(p1_rows_q4)(j, base, rb, r0, r1, r_pf, out);
    return 1;
}

/* Down pieces of 64 weights (2 blocks: a dense model's 64-neuron experts) as FIC_FFN_FIXED takes
 * them: two consecutive rows (rb = 2 blocks apart) fill one quad against x's two blocks twice,
 * row 2p in lanes 0-7 and row 2p + 1 in lanes 8-15. Rows [0, nr) at w, nr <= P2_ROWS, into
 * out[0..nr); a row's bits do not depend on nr (an odd last row loads its 2 blocks alone). */
Q4V_TGT static ALWAYS_INLINE void Q4V(q4_rows_k64)(const job_t *j, const uint8_t *w, int64_t rb, int nr, float *out) {
    const int is1 = j->fmt == FIC_Q4_1;
    const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
    const __m512i xl = _mm512_loadu_si512((const void *)j->xq), xh = _mm512_loadu_si512((const void *)(j->xq + 64));
    const __m512i xlo = _mm512_shuffle_i32x4(xl, xl, 0x44), xhi = _mm512_shuffle_i32x4(xh, xh, 0x44);
    const __m512 s16 = _mm512_loadu_ps(j->xscale16), c16 = _mm512_loadu_ps(j->xcorr16);
    const __m512 sc = _mm512_shuffle_f32x4(s16, s16, 0x44), corr = _mm512_shuffle_f32x4(c16, c16, 0x44);
    __m256 h[P2_ROWS];
    for (int p = 0; p < P2_ROWS / 2; p++) {
        __m512 acc = _mm512_setzero_ps(), accm = acc;
        if (2 * p + 1 < nr)
            Q4V(q4_quad)(w + 2 * p * rb, stride, is1, 4, xlo, xhi, sc, corr, &acc, &accm);
        else if (2 * p < nr)
            Q4V(q4_quad)(w + 2 * p * rb, stride, is1, 2, xlo, xhi, sc, corr, &acc, &accm);
        const __m512 s = _mm512_add_ps(acc, accm);
        h[2 * p] = _mm512_castps512_ps256(s);
        h[2 * p + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    }
    float all[P2_ROWS];
    sum8_rows(h, all);
    for (int i = 0; i < nr; i++) out[i] = all[i];
}

/* FIC_FFN_FIXED calls: each expert's row pieces rounded on their own, P2_ROWS rows at a time, into
 * the fixed-point sums. A piece's bits depend only on the piece and h_e (chunks start at multiples of
 * P2_ROWS, ffn.c), not on the call's other experts: no call and reduction set-up per piece, which
 * for a dense model's 64-weight pieces was most of the work. */
Q4V_TGT static void Q4V(down_cols_q4_fixed)(const ffn_t *f, int64_t r0, int64_t r1) {
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        for (int64_t r = r0; r < r1; r += P2_ROWS) {
            const int nr = r1 - r < P2_ROWS ? (int)(r1 - r) : P2_ROWS;
            const uint8_t *w = down_part(f, e) + r * rb;
            float out[P2_ROWS];
            p2_prefetch(w, rb, r, nr, r1);
            if (!j->q4_int8)
                for (int i = 0; i < nr; i++) out[i] = dot_row(j, w + i * rb, j->x);
            else if (j->k == 64)
                Q4V(q4_rows_k64)(j, w, rb, nr, out);
            else if (nr == P2_ROWS)
                Q4V(q4_rows)(j, w, rb, P2_ROWS, out);
            else
                for (int i = 0; i < nr; i++) out[i] = Q4V(q4_row)(j, w + i * rb);
            fixed_add(f->kt, out, f->acc + r, nr);
        }
    }
}

/* The AVX-512 phase 2 paths sum every expert into one accumulator per row; FIC_FFN_FIXED calls
 * (each expert rounded on its own) take down_cols_q4_fixed. */
Q4V_TGT static int Q4V(down_cols_q4)(const ffn_t *f, int64_t r0, int64_t r1) {
    if (f->acc != NULL)
        Q4V(down_cols_q4_fixed)(f, r0, r1);
    else
        Q4V(down_cols_q4_sum)(f, r0, r1);
    return 1;
}
