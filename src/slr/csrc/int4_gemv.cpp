// slr's C++ kernels: y[M, N] = x[M, K] W^T for a 4-bit grouped-quantized W, dense or 2:4 sparse, float32
// activations, AVX2 + FMA. Dense first; the 2:4 kernel (slr_int4_nm24_mm) is described further down.
//
//   W[n, k] = scale[n, k / g] * (code[n, k] - zero[n, k / g])          (slr.quant's grid; symmetric: zero = 8)
//
// Inputs (all contiguous, row-major; K and g multiples of 32, g dividing K):
//   x      float32 [M, K]
//   w      uint8   [N, K / 2]   codes in blocks of 32 (16 bytes): in block b of row n, the little-endian uint16
//                               word i (i = 0..7) holds in its bits 4 j .. 4 j + 3 (j = 0..3) code[n, 32 b + 8 j + i],
//                               so that widening the 8 words to int32 lanes and shifting by 4 j yields 8 consecutive
//                               codes, lane for lane next to 8 consecutive inputs (slr.kernels.nibble_codes)
//   scale  float32 [N, K / g]
//   sz     float32 [N, K / g]   scale * zero (exact in float32: an fp16 value times an integer below 16)
//   y      float32 [M, N]       written, not accumulated into
//
// One row of x (decode): per group, sums of code * x in float32 (two independent accumulators), scaled by the
// group's scale once; the zero part is subtracted at the end as sum_g sz_g * (sum of x over group g).
// Two to four rows of x: each weight is rebuilt in registers as fma(code, scale, -sz) -- the exact value that the
// dequantized matrix holds, since both products are exact and the one rounding leaves scale * (code - zero)
// exact -- and shared by the rows. Either way only the summation order differs from a dense float32 matmul.
// Output rows go to OpenMP threads in contiguous chunks; the weights of the rows ahead are prefetched.
//
// The vector code is compiled for AVX2 + FMA through a target attribute rather than -mavx2 -mfma on the whole file,
// so that the entry points (and the CPU check in them) run on any x86-64 CPU: slr_int4_mm refuses to run without
// AVX2 + FMA instead of faulting.

#include <cstdint>
#include <immintrin.h>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#define SLR_AVX2 __attribute__((target("avx2,fma")))

constexpr int64_t MAX_M = 4;              // rows of x per pass over the weights
constexpr int64_t WEIGHTS_PER_THREAD = 1 << 16;  // below this much work a thread costs more than it saves

SLR_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The 8 words of a 32-code block, one per int32 lane.
SLR_AVX2 inline __m256i load_block(const uint8_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Codes 8 J .. 8 J + 7 of a block as floats.
template <int J>
SLR_AVX2 inline __m256 codes(__m256i v) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    if (J == 0) return _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
    if (J == 3) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 12));  // the words are 16 bits: nothing above
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * J), low));
}

struct Args {
    const float* x;
    int64_t K;
    const uint8_t* w;
    const float* scale;
    const float* sz;
    int64_t gs;
    int64_t N;
    float* y;
    const float* xs;  // [M, G] sums of x over each group (the group-sum kernel)
};

// Loads the R rows' block b (and prefetches the same block 2 R rows ahead).
template <int R>
SLR_AVX2 inline void blocks(const Args& a, int64_t n, int64_t b, __m256i* v) {
    const int64_t row = a.K / 2;
    for (int r = 0; r < R; ++r) {
        const uint8_t* p = a.w + (n + r) * row + 16 * b;
        if ((b & 3) == 0 && n + 2 * R < a.N) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * R * row), _MM_HINT_T0);
        v[r] = load_block(p);
    }
}

// Output rows n .. n + R - 1 for one row of x: group sums.
template <int R>
SLR_AVX2 __attribute__((noinline)) void rows_group_sums(const Args& a, int64_t n) {
    const int64_t G = a.K / a.gs, per_group = a.gs / 32;
    __m256 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 acc[R][2];
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m256i v[R];
            blocks<R>(a, n, b, v);
            const float* xb = a.x + 32 * b;
            const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
            const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
            for (int r = 0; r < R; ++r) {
                acc[r][0] = _mm256_fmadd_ps(codes<0>(v[r]), x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(codes<1>(v[r]), x1, acc[r][1]);
                acc[r][0] = _mm256_fmadd_ps(codes<2>(v[r]), x2, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(codes<3>(v[r]), x3, acc[r][1]);
            }
        }
        for (int r = 0; r < R; ++r)
            tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(a.scale[(n + r) * G + g]), _mm256_add_ps(acc[r][0], acc[r][1]),
                                     tot[r]);
    }
    for (int r = 0; r < R; ++r) {
        float zs = 0.f;
        for (int64_t g = 0; g < G; ++g) zs += a.sz[(n + r) * G + g] * a.xs[g];
        a.y[n + r] = hsum(tot[r]) - zs;
    }
}

// Output rows n .. n + R - 1 for M rows of x: weights rebuilt once, shared by the rows of x.
template <int R, int M>
SLR_AVX2 __attribute__((noinline)) void rows_dequant(const Args& a, int64_t n) {
    const int64_t K = a.K, G = K / a.gs, per_group = a.gs / 32;
    __m256 acc[R][M][2];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 s[R], nz[R];
        for (int r = 0; r < R; ++r) {
            s[r] = _mm256_set1_ps(a.scale[(n + r) * G + g]);
            nz[r] = _mm256_set1_ps(-a.sz[(n + r) * G + g]);
        }
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m256i v[R];
            blocks<R>(a, n, b, v);
            const float* xb = a.x + 32 * b;
#define SLR_STEP(J)                                                                               \
    {                                                                                             \
        __m256 wv[R];                                                                             \
        for (int r = 0; r < R; ++r) wv[r] = _mm256_fmadd_ps(codes<J>(v[r]), s[r], nz[r]);         \
        for (int m = 0; m < M; ++m) {                                                             \
            const __m256 xv = _mm256_loadu_ps(xb + m * K + 8 * J);                                  \
            for (int r = 0; r < R; ++r) acc[r][m][J & 1] = _mm256_fmadd_ps(wv[r], xv, acc[r][m][J & 1]); \
        }                                                                                         \
    }
            SLR_STEP(0) SLR_STEP(1) SLR_STEP(2) SLR_STEP(3)
#undef SLR_STEP
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) a.y[m * a.N + n + r] = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
}

// Output rows [n0, n1) for M (1..4) rows of x: two output rows at a time where the accumulators fit the registers.
template <int M>
SLR_AVX2 void row_range(const Args& a, int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (M == 1) {
        for (; n + 2 <= n1; n += 2) rows_group_sums<2>(a, n);
        for (; n < n1; ++n) rows_group_sums<1>(a, n);
        return;
    }
    if (M == 2)
        for (; n + 2 <= n1; n += 2) rows_dequant<2, M>(a, n);
    for (; n < n1; ++n) rows_dequant<1, M>(a, n);
}

SLR_AVX2 void run(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, const float* sz,
                  int64_t gs, int64_t N, float* y, int64_t n0, int64_t n1) {
    const int64_t G = K / gs;
    std::vector<float> xs(G);
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const Args a{x + m0 * K, K, w, scale, sz, gs, N, y + m0 * N, xs.data()};
        switch (mm) {
            case 1:
                for (int64_t g = 0; g < G; ++g) {
                    float s = 0.f;
                    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += a.x[k];
                    xs[g] = s;
                }
                row_range<1>(a, n0, n1);
                break;
            case 2: row_range<2>(a, n0, n1); break;
            case 3: row_range<3>(a, n0, n1); break;
            default: row_range<4>(a, n0, n1); break;
        }
    }
}

// ---- 2:4 sparse W: two kept weights in every group of four inputs ---------------------------------------------------
//
//   vals   uint8 [N, K / 4]   the 4-bit codes of the K / 2 kept weights of each row (in column order), in the dense
//                             kernel's layout: blocks of 32 kept weights (64 inputs, 16 bytes), word i nibble j =
//                             kept weight 8 j + i of the block
//   idx    uint8 [N, K / 8]   each kept weight's position (0..3) in its group of four inputs, 2 bits: block b's
//                             8 bytes, byte i bits 2 j .. 2 j + 1 = kept weight 8 j + i (slr.kernels.nm24_index)
//   scale, sz as above, groups of g inputs of the dense row (g a multiple of 16, K a multiple of 64)
//
// Kept weights 8 j .. 8 j + 7 of a block read inputs 16 j .. 16 j + 15: lanes 0-3 from the first 8 (two groups of
// four), lanes 4-7 from the next 8, each picked by a lane permute with index 4 ((lane >> 1) & 1) + position. Each
// weight is rebuilt as fma(code, scale, -sz), exact, so again only the summation order differs.

// One output row n for M rows of x; group[c] = the group of inputs 16 c .. 16 c + 15 (no division in the loop).
template <int M>
SLR_AVX2 __attribute__((noinline)) void nm24_row(const float* x, int64_t K, const uint8_t* vals, const uint8_t* idx,
                                                 const float* scale, const float* sz, const int32_t* group,
                                                 int64_t G, int64_t N, float* y, int64_t n) {
    const int64_t nb = K / 64;
    const uint8_t* vr = vals + n * (K / 4);
    const uint8_t* ir = idx + n * (K / 8);
    const float* sr = scale + n * G;
    const float* zr = sz + n * G;
    const __m256i three = _mm256_set1_epi32(3), base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        if ((b & 3) == 0 && n + 2 < N) {
            _mm_prefetch(reinterpret_cast<const char*>(vr + 2 * (K / 4) + 16 * b), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(ir + 2 * (K / 8) + 8 * b), _MM_HINT_T0);
        }
        const __m256i v = load_block(vr + 16 * b);
        const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ir + 8 * b)));
#define SLR_NM_STEP(J)                                                                                      \
    {                                                                                                       \
        const int64_t g = group[4 * b + J];                                                                 \
        const __m256 wv = _mm256_fmadd_ps(codes<J>(v), _mm256_set1_ps(sr[g]), _mm256_set1_ps(-zr[g]));     \
        const __m256i p = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(ix, 2 * J), three), base);     \
        for (int m = 0; m < M; ++m) {                                                                       \
            const float* xj = x + m * K + 64 * b + 16 * J;                                                  \
            const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xj), p),             \
                                              _mm256_permutevar8x32_ps(_mm256_loadu_ps(xj + 8), p), 0xF0);  \
            acc[m][J & 1] = _mm256_fmadd_ps(wv, xg, acc[m][J & 1]);                                         \
        }                                                                                                   \
    }
        SLR_NM_STEP(0) SLR_NM_STEP(1) SLR_NM_STEP(2) SLR_NM_STEP(3)
#undef SLR_NM_STEP
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

SLR_AVX2 void nm24_run(const float* x, int64_t M, int64_t K, const uint8_t* vals, const uint8_t* idx,
                       const float* scale, const float* sz, int64_t gs, int64_t N, float* y, int64_t n0, int64_t n1) {
    std::vector<int32_t> group(K / 16);
    for (int64_t c = 0; c < K / 16; ++c) group[c] = static_cast<int32_t>(16 * c / gs);
    const int32_t* gp = group.data();
    const int64_t G = K / gs;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        for (int64_t n = n0; n < n1; ++n) switch (mm) {
                case 1: nm24_row<1>(xm, K, vals, idx, scale, sz, gp, G, N, ym, n); break;
                case 2: nm24_row<2>(xm, K, vals, idx, scale, sz, gp, G, N, ym, n); break;
                case 3: nm24_row<3>(xm, K, vals, idx, scale, sz, gp, G, N, ym, n); break;
                default: nm24_row<4>(xm, K, vals, idx, scale, sz, gp, G, N, ym, n); break;
            }
    }
}

// Threads for N rows of K inputs: at most `threads`, one per WEIGHTS_PER_THREAD weights and per two rows.
int64_t thread_count(int threads, int64_t N, int64_t K) {
    int64_t nt = threads < 1 ? 1 : threads;
    const int64_t by_work = N * K / WEIGHTS_PER_THREAD, by_rows = N / 2;
    if (nt > by_work) nt = by_work;
    if (nt > by_rows) nt = by_rows;
    return nt < 1 ? 1 : nt;
}

// Calls f(n0, n1) on contiguous chunks of an even number of rows, on nt OpenMP threads (or inline for one).
template <class F>
void parallel_rows(int64_t nt, int64_t N, F f) {
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(static_cast<int>(nt))
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t chunk = (N / 2 + T - 1) / T * 2;
            const int64_t n0 = t * chunk < N ? t * chunk : N, n1 = n0 + chunk < N ? n0 + chunk : N;
            f(n0, n1);
        }
        return;
    }
#endif
    (void)nt;
    f(0, N);
}

}  // namespace

extern "C" {

// The calling convention and the weight layout; bumped whenever either changes.
int slr_int4_abi(void) { return 2; }

// 1 when this CPU has AVX2 and FMA (the kernel runs), 0 otherwise.
int slr_int4_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// y = x W^T (see the top of this file) on up to `threads` threads. Returns 0; -1 for shapes it does not take
// (K or g not a multiple of 32, g not dividing K, a negative size); -2 on a CPU without AVX2 + FMA.
int slr_int4_mm(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, const float* sz,
                int64_t gs, int64_t N, float* y, int threads) {
    if (M < 0 || N < 0 || K <= 0 || gs <= 0 || K % 32 || gs % 32 || K % gs) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || N == 0) return 0;
    parallel_rows(thread_count(threads, N, K), N,
                  [&](int64_t n0, int64_t n1) { run(x, M, K, w, scale, sz, gs, N, y, n0, n1); });
    return 0;
}

// y = x W^T for a 2:4 W (see the 2:4 section above). Returns 0; -1 for shapes it does not take (K not a multiple
// of 64, g not a multiple of 16 or not dividing K, a negative size); -2 on a CPU without AVX2 + FMA.
int slr_int4_nm24_mm(const float* x, int64_t M, int64_t K, const uint8_t* vals, const uint8_t* idx,
                     const float* scale, const float* sz, int64_t gs, int64_t N, float* y, int threads) {
    if (M < 0 || N < 0 || K <= 0 || gs <= 0 || K % 64 || gs % 16 || K % gs) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || N == 0) return 0;
    parallel_rows(thread_count(threads, N, K / 2), N,
                  [&](int64_t n0, int64_t n1) { nm24_run(x, M, K, vals, idx, scale, sz, gs, N, y, n0, n1); });
    return 0;
}

}  // extern "C"
