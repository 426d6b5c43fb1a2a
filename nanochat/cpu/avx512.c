/* nanochat's kernels for bf16 CPU inference on x86 CPUs with AVX-512 and AMX (Intel Sapphire Rapids
   on): the matmul y = x @ W.T of bf16 x and W on AMX (for the MLP's hidden layer with its ReLU and
   square, for the lm_head with the soft cap of its logits, in the same pass), and in AVX-512 the
   soft cap of bf16 logits.

   At decode sizes (a few rows of x) torch's oneDNN call costs 25-40 us whatever the layer's size,
   five to ten times the work itself; a call here costs a few. The work is AMX's tile multiply:
   a tile of up to 16 rows of x by 32 of its features (tmm2) against a panel of W's 16 output
   features by the same 32 (tmm3/tmm4, in AMX's "VNNI" layout: row i holds features 2i and 2i+1 of
   each of the 16 outputs side by side) accumulates 16 x 16 fp32 sums in tmm0/tmm1, two panels at a
   time. W is packed once into such panels (kernels.py's pack_bf16): panel p, (k/2, 16, 2).

   Each output is its fp32 sum rounded to bf16 (to nearest, even), as oneDNN's is: the same values
   as torch's bf16 nn.Linear.

   Compiled into the same library as kernels.c (kernels.py), with these instruction sets turned on
   per function: the library still loads on a CPU without them. kernels.c calls the cap here only
   where the CPU has AVX-512, and kernels.py the matmul only where it has AMX and amx_init succeeds. */

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for an extended state component */
#define XFEATURE_XTILEDATA 18      /* AMX's tile data */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

/* 1 if this process may use the AMX tiles (Linux grants them per process, on request), else 0. */
int amx_init(void)
{
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct tile_config {
    unsigned char palette, start_row, reserved[14];
    unsigned short bytes_per_row[16];
    unsigned char rows[16];
};

/* The calling thread's tiles: tmm0, tmm1 sums and tmm2 x for `m` rows; tmm3, tmm4 panels of 16 pairs. */
static AMX void configure(int m)
{
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 5; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = t < 3 ? m : 16;
    }
    _tile_loadconfig(&config);
}

/* exp of 16 floats in [-100, 88] (or NaN), to about 1 ulp: 2^n times Cephes' degree-6 polynomial
   of the remainder, as kernels.c's exp8; 2^n by scalef, which goes to 0 through the denormals. */
static inline AVX512 __m512 exp16(__m512 t)
{
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
    t = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), t);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(t, t), _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* cap tanh(z / cap) of 16 floats, as cap - 2 cap / (1 + exp(2 z / cap)) with the division by one
   reciprocal estimate and a Newton step. 2 z / cap is clamped to [-30, 30], where tanh is already
   +-1 in fp32 (max/min return their second operand when either is NaN: a NaN stays NaN). */
static inline AVX512 __m512 cap16(__m512 z, float cap)
{
    __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(2.0f / cap));
    t = _mm512_min_ps(_mm512_set1_ps(30.0f), _mm512_max_ps(_mm512_set1_ps(-30.0f), t));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(t));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_fnmadd_ps(_mm512_set1_ps(2.0f * cap), r, _mm512_set1_ps(cap));
}

enum { PLAIN, RELU_SQUARE, CAPPED }; /* what amx_matmul writes: see emit */

/* One row's 16 sums of a panel into y at `at`: rounded to bf16 (PLAIN); then through ReLU and
   squared, rounded again (RELU_SQUARE: the MLP's hidden layer as torch's bf16 relu and square give
   it); or the capped fp32 of that bf16 (CAPPED: the lm_head's logits, as GPT.forward caps the bf16
   ones, without writing them). max returns its second operand for a NaN, which stays NaN. */
static inline AMX void emit(const float *sums, void *y, long at, int op, float cap)
{
    __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums));
    __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
    if (op == CAPPED) {
        _mm512_storeu_ps((float *)y + at, cap16(z, cap));
        return;
    }
    if (op == RELU_SQUARE) {
        z = _mm512_max_ps(_mm512_setzero_ps(), z);
        rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(z, z));
    }
    _mm256_storeu_si256((__m256i *)((unsigned short *)y + at), rounded);
}

/* y (rows, n), contiguous = x (rows, k; rows ldx apart) @ W.T for W (n, k) packed as n / 16 panels;
   k a multiple of 32, n of 16; x and W bf16, y bf16 or (CAPPED) fp32, as `op` says (see emit). The
   threads split the panels; each configures its own tiles. */
AMX void amx_matmul(const unsigned short *panels, const unsigned short *x, int rows, int k, long ldx,
                    int n, void *y, int op, float cap, int threads)
{
    int blocks = k / 32, count = n / 16;
    long panel = 16L * k; /* elements per panel */
#pragma omp parallel num_threads(threads)
    {
        float sums[2][16][16] __attribute__((aligned(64)));
        for (int start = 0; start < rows; start += 16) {
            int m = rows - start < 16 ? rows - start : 16;
            const unsigned short *a = x + start * ldx;
            configure(m);
#pragma omp for schedule(static)
            for (int p = 0; p < count; p += 2) {
                const unsigned short *b = panels + p * panel;
                int pair = p + 1 < count;
                _tile_zero(0);
                _tile_zero(1);
                for (int i = 0; i < blocks; i++) {
                    _tile_loadd(2, a + i * 32, ldx * 2);
                    _tile_loadd(3, b + i * 512, 64);
                    _tile_dpbf16ps(0, 2, 3);
                    if (pair) {
                        _tile_loadd(4, b + panel + i * 512, 64);
                        _tile_dpbf16ps(1, 2, 4);
                    }
                }
                _tile_stored(0, sums[0], 64);
                _tile_stored(1, sums[1], 64);
                for (int j = 0; j <= pair; j++)
                    for (int r = 0; r < m; r++)
                        emit(sums[j][r], y, (long)(start + r) * n + (p + j) * 16, op, cap);
            }
        }
        _tile_release();
    }
}

/* kernels.c's softcap_bf16 on a CPU with AVX-512: out (rows, n) fp32, contiguous = cap tanh(x / cap)
   of bf16 x (a row's `n` values `ld` apart), 16 at a time, the tail through a masked load. */
AVX512 void softcap_bf16_avx512(const unsigned short *x, int rows, int n, long ld, float *out, float cap, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const unsigned short *row = x + r * ld;
        float *capped = out + (long)r * n;
        for (int i = 0; i < n; i += 16) {
            __mmask16 lanes = n - i >= 16 ? 0xffff : (1u << (n - i)) - 1;
            __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, row + i));
            _mm512_mask_storeu_ps(capped + i, lanes, cap16(_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)), cap));
        }
    }
}
