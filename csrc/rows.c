/* rows.c - row-wise float operations between the kernels: RMSNorm over rows and RoPE over tokens x
 * heads, for a prefill's T tokens (numpy's temporaries made them a fifth of a 1-bit model's prefill:
 * bench/RESULTS.md) and for decode.c's one. Portable C, one pass per row; RMSNorm's sum of squares in
 * four double partial sums so that it pipelines. */
#include <math.h>
#include <stdint.h>

#include "fic.h"

int fic_rmsnorm_rows(const float *x, const float *w, float eps, int64_t n_rows, int64_t n, float *out) {
    if (x == NULL || w == NULL || out == NULL || n_rows < 0 || n <= 0 || !(eps >= 0.0f)) return FIC_ERR_ARG;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t i = 0;
        for (; i + 4 <= n; i += 4)
            for (int j = 0; j < 4; j++) s[j] += (double)xr[i + j] * xr[i + j];
        for (; i < n; i++) s[0] += (double)xr[i] * xr[i];
        const float scale = (float)(1.0 / sqrt(((s[0] + s[1]) + (s[2] + s[3])) / (double)n + (double)eps));
        for (i = 0; i < n; i++) o[i] = (xr[i] * scale) * w[i];
    }
    return FIC_OK;
}

int fic_rope_rows(float *x, int64_t n_tok, int64_t n_heads, int64_t hd, const float *cos_t, const float *sin_t) {
    if (x == NULL || cos_t == NULL || sin_t == NULL || n_tok < 0 || n_heads < 0 || hd <= 0 || hd % 2 != 0)
        return FIC_ERR_ARG;
    const int64_t h = hd / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *c = cos_t + t * hd, *s = sin_t + t * hd;
        for (int64_t j = 0; j < n_heads; j++) {
            float *v = x + (t * n_heads + j) * hd;
            for (int64_t d = 0; d < h; d++) {
                const float a = v[d], b = v[d + h];
                v[d] = a * c[d] - b * s[d];
                v[d + h] = b * c[d + h] + a * s[d + h];
            }
        }
    }
    return FIC_OK;
}
