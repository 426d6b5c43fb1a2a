/* nanochat's fp32 matmul for CPU inference: y = x @ W.T with AVX2 and FMA.

   The weight W (n, k) is packed once into panels of PANEL output features: panel p holds
   W[PANEL*p : PANEL*(p+1), :] transposed, a contiguous (k, PANEL) block. A tile of up to TILE rows
   of x against one panel keeps its 2*TILE accumulators in registers: each step reads one row of the
   panel (two vectors), broadcasts one element of each x row and does two FMAs per row. The weight
   streams from memory once per call, in order, and the threads split the panels between them.

   Built and loaded by cpu_kernels.py, which compiles it with -fopenmp: loaded after torch, it
   shares torch's OpenMP runtime (the same libgomp.so.1), so its threads are torch's threads. */

#include <immintrin.h>

#define PANEL 16 /* output features per panel: two 8-float vectors */
#define TILE 6   /* rows of x per tile: 12 accumulators, enough to keep both FMA units busy */
#define BLOCK_FLOATS 65536 /* x's elements per block of rows: 256 KB, within a core's L2 */

/* y[r, 0:PANEL] = x[r, :] @ panel for rows r < rows (at most TILE); rows is a constant where
   this is inlined, so the loops over it unroll. */
static inline __attribute__((always_inline)) void tile(const float *panel, const float *x, float *y,
                                                       int rows, int k, int n)
{
    __m256 lo[TILE], hi[TILE];
    for (int r = 0; r < rows; r++)
        lo[r] = hi[r] = _mm256_setzero_ps();
    for (int d = 0; d < k; d++) {
        __m256 w_lo = _mm256_loadu_ps(panel + d * PANEL), w_hi = _mm256_loadu_ps(panel + d * PANEL + 8);
        for (int r = 0; r < rows; r++) {
            __m256 xd = _mm256_broadcast_ss(x + (long)r * k + d);
            lo[r] = _mm256_fmadd_ps(xd, w_lo, lo[r]);
            hi[r] = _mm256_fmadd_ps(xd, w_hi, hi[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(y + (long)r * n, lo[r]);
        _mm256_storeu_ps(y + (long)r * n + 8, hi[r]);
    }
}

/* y (rows, n) = x (rows, k) @ W.T, W as n / PANEL panels (n a multiple of PANEL), on `threads`
   OpenMP threads. All arrays are fp32 and contiguous. Many rows go in blocks of about BLOCK_FLOATS
   elements of x, so that the block stays in cache while every panel passes over it. */
void panel_matmul(const float *panels, const float *x, float *y, int rows, int k, int n, int threads)
{
    int block = BLOCK_FLOATS / k / TILE * TILE;
    if (block < TILE)
        block = TILE;
#pragma omp parallel num_threads(threads)
    for (int start = 0; start < rows; start += block) {
        int end = start + block < rows ? start + block : rows;
#pragma omp for schedule(static)
        for (int p = 0; p < n / PANEL; p++) {
            const float *panel = panels + (long)p * k * PANEL;
            int r = start;
            for (; r + TILE <= end; r += TILE)
                tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, TILE, k, n);
            switch (end - r) { /* the last few rows, each count its own unrolled tile */
            case 5: tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, 5, k, n); break;
            case 4: tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, 4, k, n); break;
            case 3: tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, 3, k, n); break;
            case 2: tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, 2, k, n); break;
            case 1: tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, 1, k, n); break;
            }
        }
    }
}
