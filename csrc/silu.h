/* silu.h - silu(g) = g / (1 + e^-g) in scalar float with expf: the FFN's gating as the references
 * compute it (silu_mul_ref, the MoE shared expert). */
#ifndef FIC_SILU_H
#define FIC_SILU_H
#include <math.h>

static inline float fic_silu(float g) { return g / (1.0f + expf(-g)); }

#endif /* FIC_SILU_H */
