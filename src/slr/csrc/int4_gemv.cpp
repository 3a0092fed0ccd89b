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
#define SLR_F16 __attribute__((target("avx2,fma,f16c")))

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

// acc[m][J & 1] += wv * the inputs that kept weights 8 J .. 8 J + 7 of block b read (positions in ix, 2 bits each).
template <int M, int J>
SLR_AVX2 inline void nm24_fma(const float* x, int64_t K, int64_t b, __m256i ix, __m256 wv, __m256 (*acc)[2]) {
    const __m256i p = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(ix, 2 * J), _mm256_set1_epi32(3)),
                                      _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4));
    for (int m = 0; m < M; ++m) {
        const float* xj = x + m * K + 64 * b + 16 * J;
        const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xj), p),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(xj + 8), p), 0xF0);
        acc[m][J & 1] = _mm256_fmadd_ps(wv, xg, acc[m][J & 1]);
    }
}

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
        nm24_fma<M, J>(x, K, b, ix, _mm256_fmadd_ps(codes<J>(v), _mm256_set1_ps(sr[g]), _mm256_set1_ps(-zr[g])), acc); \
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

// ---- 2:4 sparse W with float16 values ------------------------------------------------------------------------------
//
//   vals   uint16 [N, K / 2]  the kept weights of each row as IEEE half floats, in column order
//   idx    uint8  [N, K / 8]  positions as in the 4-bit 2:4 kernel: kept weights 8 j .. 8 j + 7 of block b (32 kept
//                             weights, 64 inputs) are vals[32 b + 8 j ..] and read inputs 64 b + 16 j .. + 15
//
// Same lane permute as the 4-bit 2:4 kernel; a half converts to float exactly, so only the summation order differs
// from a dense float32 matmul of the same matrix.
template <int M>
SLR_F16 __attribute__((noinline)) void nm24_f16_row(const float* x, int64_t K, const uint16_t* vals,
                                                    const uint8_t* idx, int64_t N, float* y, int64_t n) {
    const int64_t nb = K / 64;
    const uint16_t* vr = vals + n * (K / 2);
    const uint8_t* ir = idx + n * (K / 8);
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        if ((b & 1) == 0 && n + 2 < N) {
            _mm_prefetch(reinterpret_cast<const char*>(vr + 2 * (K / 2) + 32 * b), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(ir + 2 * (K / 8) + 8 * b), _MM_HINT_T0);
        }
        const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ir + 8 * b)));
#define SLR_NMH_STEP(J) \
    nm24_fma<M, J>(x, K, b, ix, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + 32 * b + 8 * J))), acc);
        SLR_NMH_STEP(0) SLR_NMH_STEP(1) SLR_NMH_STEP(2) SLR_NMH_STEP(3)
#undef SLR_NMH_STEP
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

SLR_F16 void nm24_f16_run(const float* x, int64_t M, int64_t K, const uint16_t* vals, const uint8_t* idx, int64_t N,
                          float* y, int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        for (int64_t n = n0; n < n1; ++n) switch (mm) {
                case 1: nm24_f16_row<1>(xm, K, vals, idx, N, ym, n); break;
                case 2: nm24_f16_row<2>(xm, K, vals, idx, N, ym, n); break;
                case 3: nm24_f16_row<3>(xm, K, vals, idx, N, ym, n); break;
                default: nm24_f16_row<4>(xm, K, vals, idx, N, ym, n); break;
            }
    }
}

// ---- dense rows of int8 (with one float32 scale per row), float16 or float32: the output head, the factors -----------
//
//   w      ROWS_I8: int8 [N, K] with scale float32 [N] (y[m, n] = scale[n] * sum_k w[n, k] x[m, k]; slr.embeddings'
//          8-bit rows); ROWS_F16: uint16 [N, K] of half floats; ROWS_F32: float32 [N, K]; any K (a scalar tail)
enum RowsKind { ROWS_F16 = 0, ROWS_I8 = 1, ROWS_F32 = 2 };

template <int M, int KIND, bool ACC = false>
SLR_F16 __attribute__((noinline)) void dense_row(const float* x, int64_t K, const void* w, const float* scale,
                                                 int64_t N, float* y, int64_t n) {
    const int8_t* w8 = static_cast<const int8_t*>(w) + n * K;
    const uint16_t* wh = static_cast<const uint16_t*>(w) + n * K;
    const float* wf = static_cast<const float*>(w) + n * K;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0, w1;
        if (KIND == ROWS_I8) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w8 + k));
            w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
            if ((k & 63) == 0 && n + 2 < N) _mm_prefetch(reinterpret_cast<const char*>(w8 + 2 * K + k), _MM_HINT_T0);
        } else if (KIND == ROWS_F16) {
            w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wh + k)));
            w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wh + k + 8)));
            if ((k & 31) == 0 && n + 2 < N) _mm_prefetch(reinterpret_cast<const char*>(wh + 2 * K + k), _MM_HINT_T0);
        } else {
            w0 = _mm256_loadu_ps(wf + k);
            w1 = _mm256_loadu_ps(wf + k + 8);
        }
        for (int m = 0; m < M; ++m) {
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
        }
    }
    for (int m = 0; m < M; ++m) {
        float s = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
        for (int64_t kk = k; kk < K; ++kk)
            s += (KIND == ROWS_I8 ? static_cast<float>(w8[kk]) : KIND == ROWS_F16 ? _cvtsh_ss(wh[kk]) : wf[kk]) *
                 x[m * K + kk];
        const float v = KIND == ROWS_I8 ? s * scale[n] : s;
        y[m * N + n] = ACC ? y[m * N + n] + v : v;
    }
}

template <int KIND, bool ACC = false>
SLR_F16 void dense_run(const float* x, int64_t M, int64_t K, const void* w, const float* scale, int64_t N, float* y,
                       int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        for (int64_t n = n0; n < n1; ++n) switch (mm) {
                case 1: dense_row<1, KIND, ACC>(xm, K, w, scale, N, ym, n); break;
                case 2: dense_row<2, KIND, ACC>(xm, K, w, scale, N, ym, n); break;
                case 3: dense_row<3, KIND, ACC>(xm, K, w, scale, N, ym, n); break;
                default: dense_row<4, KIND, ACC>(xm, K, w, scale, N, ym, n); break;
            }
    }
}

// dense_run for a kind chosen at run time.
template <bool ACC>
SLR_F16 void rows_run(int kind, const float* x, int64_t M, int64_t K, const void* w, const float* scale, int64_t N,
                      float* y, int64_t n0, int64_t n1) {
    if (kind == ROWS_I8) dense_run<ROWS_I8, ACC>(x, M, K, w, scale, N, y, n0, n1);
    else if (kind == ROWS_F16) dense_run<ROWS_F16, ACC>(x, M, K, w, scale, N, y, n0, n1);
    else dense_run<ROWS_F32, ACC>(x, M, K, w, scale, N, y, n0, n1);
}

// ---- unpacking to a dense float32 matrix (prefill: one dense GEMM beats the kernels at many tokens) ------------------
SLR_AVX2 void unpack_int4_rows(int64_t K, const uint8_t* w, const float* scale, const float* sz, int64_t gs,
                               float* out, int64_t n0, int64_t n1) {
    const int64_t G = K / gs, per_group = gs / 32;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < G; ++g) {
            const __m256 s = _mm256_set1_ps(scale[n * G + g]), nz = _mm256_set1_ps(-sz[n * G + g]);
            for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
                const __m256i v = load_block(w + n * (K / 2) + 16 * b);
                float* o = out + n * K + 32 * b;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(codes<0>(v), s, nz));
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(codes<1>(v), s, nz));
                _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(codes<2>(v), s, nz));
                _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(codes<3>(v), s, nz));
            }
        }
}

// 2:4, 4-bit codes (vals non-null with scale, sz) or half floats (hvals): kept weight 8 j + i of block b goes to
// input 64 b + 16 j + 4 (i / 2) + position; the other inputs are zero.
SLR_F16 void unpack_nm24_rows(int64_t K, const uint8_t* vals, const uint16_t* hvals, const uint8_t* idx,
                              const float* scale, const float* sz, int64_t gs, float* out, int64_t n0, int64_t n1) {
    const int64_t nb = K / 64, G = gs > 0 ? K / gs : 0;
    alignas(32) float wv[32];
    for (int64_t n = n0; n < n1; ++n) {
        float* o = out + n * K;
        for (int64_t k = 0; k < K; ++k) o[k] = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
            if (hvals) {
                for (int j = 0; j < 4; ++j)
                    _mm256_store_ps(wv + 8 * j, _mm256_cvtph_ps(_mm_loadu_si128(
                                                    reinterpret_cast<const __m128i*>(hvals + n * (K / 2) + 32 * b + 8 * j))));
            } else {
                const __m256i v = load_block(vals + n * (K / 4) + 16 * b);
                const __m256 c[4] = {codes<0>(v), codes<1>(v), codes<2>(v), codes<3>(v)};
                for (int j = 0; j < 4; ++j) {
                    const int64_t g = (64 * b + 16 * j) / gs;
                    _mm256_store_ps(wv + 8 * j, _mm256_fmadd_ps(c[j], _mm256_set1_ps(scale[n * G + g]),
                                                                _mm256_set1_ps(-sz[n * G + g])));
                }
            }
            const uint8_t* ib = idx + n * (K / 8) + 8 * b;
            for (int j = 0; j < 4; ++j)
                for (int i = 0; i < 8; ++i)
                    o[64 * b + 16 * j + 4 * (i / 2) + ((ib[i] >> (2 * j)) & 3)] = wv[8 * j + i];
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
int slr_int4_abi(void) { return 5; }

// 1 when this CPU has AVX2, FMA and F16C (the kernel runs), 0 otherwise.
int slr_int4_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 1 : 0;
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

// y = x W^T for a 2:4 W with half-float values (the float16 2:4 section). Returns 0; -1 for shapes it does not
// take (K not a multiple of 64, a negative size); -2 on a CPU without AVX2 + FMA + F16C.
int slr_f16_nm24_mm(const float* x, int64_t M, int64_t K, const uint16_t* vals, const uint8_t* idx, int64_t N,
                    float* y, int threads) {
    if (M < 0 || N < 0 || K <= 0 || K % 64) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || N == 0) return 0;
    parallel_rows(thread_count(threads, N, K), N,
                  [&](int64_t n0, int64_t n1) { nm24_f16_run(x, M, K, vals, idx, N, y, n0, n1); });
    return 0;
}

// y = x W^T for a dense W of `kind` ROWS_F16 (0), ROWS_I8 (1: with float32 row scales) or ROWS_F32 (2).
int slr_rows_mm(const float* x, int64_t M, int64_t K, const void* w, const float* scale, int64_t N, float* y,
                int threads, int kind) {
    if (M < 0 || N < 0 || K <= 0 || kind < 0 || kind > 2 || (kind == ROWS_I8) != (scale != nullptr)) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || N == 0) return 0;
    parallel_rows(thread_count(threads, N, kind == ROWS_I8 ? K / 4 : kind == ROWS_F16 ? K / 2 : K), N,
                  [&](int64_t n0, int64_t n1) { rows_run<false>(kind, x, M, K, w, scale, N, y, n0, n1); });
    return 0;
}

// y [M, N] += (x V^T) U^T: the low-rank part of a layer in one call. V [r, K] and U [N, r] are rows of `vkind` /
// `ukind` (float16 or float32); with V null, z [M, r] = x V^T is given (a shared projection's output).
int slr_lowrank_add(const float* x, int64_t M, int64_t K, const void* V, int vkind, const float* z, const void* U,
                    int ukind, int64_t r, int64_t N, float* y, int threads) {
    if (M < 0 || N < 0 || K <= 0 || r <= 0 || (V == nullptr) == (z == nullptr) || ukind == ROWS_I8 ||
        (V && vkind == ROWS_I8) || ukind < 0 || ukind > 2 || vkind < 0 || vkind > 2)
        return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || N == 0) return 0;
    std::vector<float> zs;
    if (V) {
        zs.resize(M * r);
        rows_run<false>(vkind, x, M, K, V, nullptr, r, zs.data(), 0, r);
        z = zs.data();
    }
    parallel_rows(thread_count(threads, N, ukind == ROWS_F16 ? r / 2 : r), N,
                  [&](int64_t n0, int64_t n1) { rows_run<true>(ukind, z, M, r, U, nullptr, N, y, n0, n1); });
    return 0;
}

// out [N, K] float32 = the dense W of a 4-bit pack (idx null: dense layout; else 2:4 with vals of 4-bit codes) or of
// a 2:4 half-float pack (hvals non-null, vals / scale / sz null). Same shape checks as the matmuls.
int slr_unpack(int64_t K, const uint8_t* vals, const uint16_t* hvals, const uint8_t* idx, const float* scale,
               const float* sz, int64_t gs, int64_t N, float* out, int threads) {
    if (N < 0 || K <= 0 || (!hvals && (gs <= 0 || K % gs))) return -1;
    if (idx ? K % 64 || (!hvals && gs % 16) : K % 32 || gs % 32) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    parallel_rows(thread_count(threads, N, K / 8), N, [&](int64_t n0, int64_t n1) {
        if (idx) unpack_nm24_rows(K, vals, hvals, idx, scale, sz, gs, out, n0, n1);
        else unpack_int4_rows(K, vals, scale, sz, gs, out, n0, n1);
    });
    return 0;
}

}  // extern "C"
