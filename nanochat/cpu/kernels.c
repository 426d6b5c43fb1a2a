/* nanochat's kernels for CPU inference, with AVX2 and FMA: the matmul y = x @ W.T of fp32 x and a
   bf16 W, in fp32; the model's RMSNorms (bf16 or fp32), and the passes of sampling over the logits
   (soft cap, softmax weights, argmax).

   The weight W (n, k) is packed once into panels of PANEL output features: panel p holds
   W[PANEL*p : PANEL*(p+1), :] transposed, a contiguous (k, PANEL) block of bf16. A tile of up to
   TILE rows of x against one panel keeps its 2*TILE accumulators in registers: each step reads one
   row of the panel (16 bf16, widened to two fp32 vectors), broadcasts one element of each x row and
   does two FMAs per row. The weight streams from memory once per call, in order, and the threads
   split the panels between them. At decode sizes that stream is the cost, so bf16 weights (half the
   bytes of fp32) are what makes a CPU without bf16 arithmetic decode fast.

   Built and loaded by kernels.py, which compiles it with -fopenmp: loaded after torch, it
   shares torch's OpenMP runtime (the same libgomp.so.1), so its threads are torch's threads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define PANEL 16 /* output features per panel: two 8-float vectors */
#define TILE 6   /* rows of x per tile: 12 accumulators, enough to keep both FMA units busy
                    (last_rows has a case for each smaller count) */
#define BLOCK_FLOATS 65536 /* x's elements per block of rows: 256 KB, within a core's L2 */

/* 8 bf16 as 8 fp32: a bf16 is the top half of the fp32 of the same value. */
static inline __attribute__((always_inline)) __m256 widen(const uint16_t *w)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}

/* y[r, 0:PANEL] = x[r, :] @ panel for rows r < rows (at most TILE); rows is a constant where
   this is inlined, so the loops over it unroll. */
static inline __attribute__((always_inline)) void tile(const uint16_t *panel, const float *x, float *y,
                                                       int rows, int k, int n)
{
    __m256 lo[TILE], hi[TILE];
    for (int r = 0; r < rows; r++)
        lo[r] = hi[r] = _mm256_setzero_ps();
    for (int d = 0; d < k; d++) {
        __m256 w_lo = widen(panel + d * PANEL), w_hi = widen(panel + d * PANEL + 8);
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

/* tile() for the few rows left after whole tiles (fewer than TILE), each count its own unrolled copy. */
static void last_rows(const uint16_t *panel, const float *x, float *y, int rows, int k, int n)
{
    switch (rows) {
    case 5: tile(panel, x, y, 5, k, n); break;
    case 4: tile(panel, x, y, 4, k, n); break;
    case 3: tile(panel, x, y, 3, k, n); break;
    case 2: tile(panel, x, y, 2, k, n); break;
    case 1: tile(panel, x, y, 1, k, n); break;
    }
}

/* y (rows, n) = x (rows, k) @ W.T, W as n / PANEL panels of bf16 (n a multiple of PANEL), on
   `threads` OpenMP threads. x and y are fp32; all arrays are contiguous. Many rows go in blocks of
   about BLOCK_FLOATS elements of x, so that the block stays in cache while every panel passes over
   it. Whole tiles call tile() directly: reached through last_rows' switch, GCC 12 compiled them
   several times slower. */
void panel_matmul(const uint16_t *panels, const float *x, float *y, int rows, int k, int n, int threads)
{
    int block = BLOCK_FLOATS / k / TILE * TILE;
    if (block < TILE)
        block = TILE;
#pragma omp parallel num_threads(threads)
    for (int start = 0; start < rows; start += block) {
        int end = start + block < rows ? start + block : rows;
#pragma omp for schedule(static)
        for (int p = 0; p < n / PANEL; p++) {
            const uint16_t *panel = panels + (long)p * k * PANEL;
            int r = start;
            for (; r + TILE <= end; r += TILE)
                tile(panel, x + (long)r * k, y + (long)r * n + p * PANEL, TILE, k, n);
            last_rows(panel, x + (long)r * k, y + (long)r * n + p * PANEL, end - r, k, n);
        }
    }
}

/* Sampling's passes over the logits, each row of `n` values `ld` apart; the threads split the rows. */

/* exp of 8 floats, to about 1 ulp (Cephes' expf: 2^round(x log2 e) times a degree-6 polynomial of
   the remainder); exactly 0 below ln(FLT_MIN), so that exp(-inf) = 0; NaN stays NaN (max/min return
   their second operand when either is NaN, so x goes second). */
static inline __m256 exp8(__m256 x)
{
    const __m256 lowest = _mm256_set1_ps(-87.33654f);
    __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(lowest, x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

static inline float exp1(float x)
{
    float out[8];
    _mm256_storeu_ps(out, exp8(_mm256_set1_ps(x)));
    return out[0];
}

static float row_max(const float *x, int n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, m);
    for (int j = 0; j < 8; j++)
        best = lanes[j] > best ? lanes[j] : best;
    for (; i < n; i++)
        best = x[i] > best ? x[i] : best;
    return best;
}

/* cap tanh(z / cap) of 8 floats, as cap - 2 cap / (1 + exp(2 z / cap)); a = 2 / cap. */
static inline __m256 cap8(__m256 z, __m256 a, __m256 c)
{
    __m256 e = exp8(_mm256_mul_ps(z, a));
    return _mm256_sub_ps(c, _mm256_div_ps(_mm256_add_ps(c, c), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

static inline float cap1(float z, float cap)
{
    float out[8];
    _mm256_storeu_ps(out, cap8(_mm256_set1_ps(z), _mm256_set1_ps(2.0f / cap), _mm256_set1_ps(cap)));
    return out[0];
}

/* In place, z -> cap tanh(z / cap). */
void softcap(float *x, int rows, int n, long ld, float cap, int threads)
{
    const __m256 a = _mm256_set1_ps(2.0f / cap), c = _mm256_set1_ps(cap);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        float *row = x + r * ld;
        int i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(row + i, cap8(_mm256_loadu_ps(row + i), a, c));
        for (; i < n; i++)
            row[i] = cap1(row[i], cap);
    }
}

/* bf16 to fp32 is exact: the 16 bits become the float's high half. */
static inline float bf16_float(unsigned short b)
{
    union { unsigned u; float f; } v = {(unsigned)b << 16};
    return v.f;
}

static inline __m256 bf16x8_float(const unsigned short *x)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16));
}

/* 8 floats to bf16, rounded to nearest even (as torch rounds); a NaN stays NaN. */
static inline __m128i float_bf16x8(__m256 f)
{
    __m256i bits = _mm256_castps_si256(f), odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

static inline unsigned short float_bf16(float f)
{
    unsigned short out[8];
    _mm_storeu_si128((__m128i *)out, float_bf16x8(_mm256_set1_ps(f)));
    return out[0];
}

void softcap_bf16_avx512(const unsigned short *x, int rows, int n, long ld, float *out, float cap, int threads);

/* out (rows, n) fp32, contiguous = cap tanh(x / cap) of bf16 x (a row's `n` values `ld` apart): the
   upcast and the cap in one pass over the logits, 8 lanes at a time (softcap_bf16 below takes it on
   a CPU without AVX-512; exported for the tests of a CPU that has it). */
void softcap_bf16_avx2(const unsigned short *x, int rows, int n, long ld, float *out, float cap, int threads)
{
    const __m256 a = _mm256_set1_ps(2.0f / cap), c = _mm256_set1_ps(cap);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const unsigned short *row = x + r * ld;
        float *capped = out + (long)r * n;
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + i)));
            _mm256_storeu_ps(capped + i, cap8(_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)), a, c));
        }
        for (; i < n; i++)
            capped[i] = cap1(bf16_float(row[i]), cap);
    }
}

/* softcap_bf16_avx2's result, by avx512.c's (twice the lanes, no division) on a CPU with AVX-512. */
void softcap_bf16(const unsigned short *x, int rows, int n, long ld, float *out, float cap, int threads)
{
    if (__builtin_cpu_supports("avx512bw"))
        softcap_bf16_avx512(x, rows, n, ld, out, cap, threads);
    else
        softcap_bf16_avx2(x, rows, n, ld, out, cap, threads);
}

/* The norms below take bf16 or fp32 activations: `bf16` is a constant where they are inlined, so
   each exported function is its dtype's own code. fp32 values pass through round_to unchanged. */
#define INLINE static inline __attribute__((always_inline))

INLINE __m256 load8(const void *x, long i, int bf16)
{
    return bf16 ? bf16x8_float((const unsigned short *)x + i) : _mm256_loadu_ps((const float *)x + i);
}

INLINE float load1(const void *x, long i, int bf16)
{
    return bf16 ? bf16_float(((const unsigned short *)x)[i]) : ((const float *)x)[i];
}

INLINE void store8(void *out, long i, __m256 v, int bf16)
{
    if (bf16)
        _mm_storeu_si128((__m128i *)((unsigned short *)out + i), float_bf16x8(v));
    else
        _mm256_storeu_ps((float *)out + i, v);
}

INLINE void store1(void *out, long i, float v, int bf16)
{
    if (bf16)
        ((unsigned short *)out)[i] = float_bf16(v);
    else
        ((float *)out)[i] = v;
}

INLINE __m256 round_to(__m256 f, int bf16) /* f rounded to the activations' dtype, as a float */
{
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(float_bf16x8(f)), 16)) : f;
}

INLINE float sum8(__m256 v)
{
    float lanes[8], sum = 0;
    _mm256_storeu_ps(lanes, v);
    for (int j = 0; j < 8; j++)
        sum += lanes[j];
    return sum;
}

/* out (rows, n), contiguous = RMSNorm of x (a row's `n` values `ld` apart) as torch's rms_norm computes
   it: in fp32, x * (1 / sqrt(mean(x^2) + eps)), rounded to x's dtype (in fp32 equal up to the order
   of the sum of squares). A call on a few rows (decoding) stays on the calling thread: a parallel
   region would cost more than the rows. */
INLINE void rms_norm_rows(const void *x, int rows, int n, long ld, void *out, float eps, int threads, int bf16)
{
#pragma omp parallel for num_threads(threads) schedule(static) if ((long)rows * n >= 65536)
    for (int r = 0; r < rows; r++) {
        long row = r * ld, normed = (long)r * n;
        __m256 squares = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = load8(x, row + i, bf16);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        float sum = sum8(squares);
        for (int j = i; j < n; j++)
            sum += load1(x, row + j, bf16) * load1(x, row + j, bf16);
        float scale = 1.0f / sqrtf(sum / n + eps);
        __m256 vs = _mm256_set1_ps(scale);
        for (i = 0; i + 8 <= n; i += 8)
            store8(out, normed + i, _mm256_mul_ps(load8(x, row + i, bf16), vs), bf16);
        for (; i < n; i++)
            store1(out, normed + i, load1(x, row + i, bf16) * scale, bf16);
    }
}

void rms_norm_bf16(const unsigned short *x, int rows, int n, long ld, unsigned short *out, float eps, int threads)
{
    rms_norm_rows(x, rows, n, ld, out, eps, threads, 1);
}

void rms_norm_f32(const float *x, int rows, int n, long ld, float *out, float eps, int threads)
{
    rms_norm_rows(x, rows, n, ld, out, eps, threads, 0);
}

/* out (rows, heads, dim), contiguous = RMSNorm(rotary(x)), one position per row (the queries and
   keys of decoding), as GPT's rotary_norm computes them: the rotation (x1 cos - x2 sin,
   x1 sin + x2 cos) of the halves of each head with every product, sum and difference rounded to
   x's dtype as torch's ops round them, then rms_norm_rows' norm. Head h of row r is at
   x + r * x_row + h * x_head; the row's angles (x's dtype) at cos + r * angle_row (0: every row
   alike), dim / 2 of each. dim a multiple of 16, at most 1024. */
INLINE void rotary_norm_rows(const void *x, int rows, int heads, int dim, long x_row, long x_head, const void *cos,
                             const void *sin, long angle_row, void *out, float eps, int threads, int bf16)
{
    int half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if ((long)rows * heads * dim >= 65536)
    for (int rh = 0; rh < rows * heads; rh++) {
        int r = rh / heads, h = rh % heads;
        long head = r * x_row + h * x_head, angles = r * angle_row;
        float rotated[1024];
        __m256 squares = _mm256_setzero_ps();
        for (int i = 0; i < half; i += 8) {
            __m256 x1 = load8(x, head + i, bf16), x2 = load8(x, head + half + i, bf16);
            __m256 vc = load8(cos, angles + i, bf16), vs = load8(sin, angles + i, bf16);
            __m256 y1 = round_to(_mm256_sub_ps(round_to(_mm256_mul_ps(x1, vc), bf16), round_to(_mm256_mul_ps(x2, vs), bf16)), bf16);
            __m256 y2 = round_to(_mm256_add_ps(round_to(_mm256_mul_ps(x1, vs), bf16), round_to(_mm256_mul_ps(x2, vc), bf16)), bf16);
            _mm256_storeu_ps(rotated + i, y1);
            _mm256_storeu_ps(rotated + half + i, y2);
            squares = _mm256_fmadd_ps(y1, y1, _mm256_fmadd_ps(y2, y2, squares));
        }
        __m256 scale = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / dim + eps));
        for (int i = 0; i < dim; i += 8)
            store8(out, (long)rh * dim + i, _mm256_mul_ps(_mm256_loadu_ps(rotated + i), scale), bf16);
    }
}

void rotary_norm_bf16(const unsigned short *x, int rows, int heads, int dim, long x_row, long x_head,
                      const unsigned short *cos, const unsigned short *sin, long angle_row,
                      unsigned short *out, float eps, int threads)
{
    rotary_norm_rows(x, rows, heads, dim, x_row, x_head, cos, sin, angle_row, out, eps, threads, 1);
}

void rotary_norm_f32(const float *x, int rows, int heads, int dim, long x_row, long x_head, const float *cos,
                     const float *sin, long angle_row, float *out, float eps, int threads)
{
    rotary_norm_rows(x, rows, heads, dim, x_row, x_head, cos, sin, angle_row, out, eps, threads, 0);
}

/* Per row r: out = exp((x - max of the row) * scale[r]), softmax's unnormalized weights; out is
   (rows, n) and contiguous. */
void softmax_weights(const float *x, int rows, int n, long ld, const float *scale, float *out, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * ld;
        float *weights = out + (long)r * n, m = row_max(row, n);
        __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale[r]);
        int i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(weights + i, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + i), vm), vs)));
        for (; i < n; i++)
            weights[i] = exp1((row[i] - m) * scale[r]);
    }
}

/* Per row, the index of its first maximum, or of its first NaN where it has one (as torch's argmax). */
void argmax(const float *x, int rows, int n, long ld, long *out, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * ld;
        __m256 vm = _mm256_set1_ps(-INFINITY), any_nan = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
            vm = _mm256_max_ps(vm, v);
            any_nan = _mm256_or_ps(any_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8], m = -INFINITY;
        _mm256_storeu_ps(lanes, vm);
        for (int j = 0; j < 8; j++)
            m = lanes[j] > m ? lanes[j] : m;
        int nan = _mm256_movemask_ps(any_nan) != 0;
        for (; i < n; i++) {
            nan |= isnan(row[i]);
            m = row[i] > m ? row[i] : m;
        }
        vm = _mm256_set1_ps(m);
        for (i = 0; i + 8 <= n; i += 8) { /* the first lane equal to m, or unordered where m is NaN */
            __m256 v = _mm256_loadu_ps(row + i);
            int hits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, vm, _CMP_EQ_OQ));
            if (hits) {
                i += __builtin_ctz(hits);
                break;
            }
        }
        while (i < n && !(nan ? isnan(row[i]) : row[i] == m))
            i++;
        out[r] = i;
    }
}
