/* The C kernels as one translation unit. The kernel families live in their own files (each also compiles on
 * its own: common.h declares what one needs from another), but built together gcc inlines across them as it
 * did in the single native.c they came from: the fused MoE calls dot_multi once per weight row and token group,
 * and as separate objects it measured ~2.5 % slower at T = 1 (128 experts of 768 x 2048, 2 threads). */
#include "quant.c"
#include "moe.c"
#include "attention.c"
#include "small.c"
