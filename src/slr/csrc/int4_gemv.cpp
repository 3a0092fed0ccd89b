// slr's C++ kernels: y[M, N] = x[M, K] W^T for a 4-bit grouped-quantized W, dense or 2:4 sparse, float32
// activations, AVX2 + FMA. Dense first; the 2:4 kernel (slr_int4_nm24_mm) is described further down, then 2-, 3- and
// 8-bit codes at their own width and one whole layer (S + low-rank part + bias) per call (slr_layer_mm).
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

#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <utility>
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
// Kept weights 8 j .. 8 j + 7 of a block read inputs 16 j .. 16 j + 15, two lanes per group of four: lanes 0-1 from
// group 0, 2-3 from group 1, 4-5 from group 2, 6-7 from group 3. x is copied once per call with the middle two groups
// of every 16 inputs swapped (nm24_permute_x), so that one load holds groups 0 and 2 (one per 128-bit half) and the
// next groups 1 and 3: an in-lane permute of each by the positions (it reads only their low 2 bits) and one blend
// give the 8 inputs; on Zen 3 that costs less than the lane-crossing permutes. Each weight is rebuilt as
// fma(code, scale, -sz), exact, so again only the summation order differs.

// x [M, K] with the inputs 4 .. 7 and 8 .. 11 of every 16 swapped (the order the 2:4 kernels read).
inline std::vector<float> nm24_permute_x(const float* x, int64_t M, int64_t K) {
    std::vector<float> xp(M * K);
    for (int64_t c = 0; c < M * K; c += 16)
        for (int t = 0; t < 4; ++t) {
            xp[c + t] = x[c + t];
            xp[c + 4 + t] = x[c + 8 + t];
            xp[c + 8 + t] = x[c + 4 + t];
            xp[c + 12 + t] = x[c + 12 + t];
        }
    return xp;
}

// acc[m][J & 1] += wv * the inputs that kept weights 8 J .. 8 J + 7 of block b read (positions in ix, 2 bits each;
// xp from nm24_permute_x).
template <int M, int J>
SLR_AVX2 inline void nm24_fma(const float* xp, int64_t K, int64_t b, __m256i ix, __m256 wv, __m256 (*acc)[2]) {
    const __m256i p = J ? _mm256_srli_epi32(ix, 2 * J) : ix;
    for (int m = 0; m < M; ++m) {
        const float* xj = xp + m * K + 64 * b + 16 * J;
        const __m256 xg = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xj), p),
                                          _mm256_permutevar_ps(_mm256_loadu_ps(xj + 8), p), 0xCC);
        acc[m][J & 1] = _mm256_fmadd_ps(wv, xg, acc[m][J & 1]);
    }
}

// One output row n for M rows of x; group[c] = the group of inputs 16 c .. 16 c + 15 (no division in the loop);
// BLOCK_GROUPS: groups of a multiple of 64 inputs, so one group's scale for the whole block (read once).
template <int M, bool BLOCK_GROUPS>
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
        const int64_t g0 = group[4 * b];
        const __m256 s0 = _mm256_set1_ps(sr[g0]), nz0 = _mm256_set1_ps(-zr[g0]);
#define SLR_NM_STEP(J)                                                                                      \
    {                                                                                                       \
        const int64_t g = group[4 * b + J];                                                                 \
        const __m256 sg = BLOCK_GROUPS ? s0 : _mm256_set1_ps(sr[g]), nzg = BLOCK_GROUPS ? nz0 : _mm256_set1_ps(-zr[g]); \
        nm24_fma<M, J>(x, K, b, ix, _mm256_fmadd_ps(codes<J>(v), sg, nzg), acc);                            \
    }
        SLR_NM_STEP(0) SLR_NM_STEP(1) SLR_NM_STEP(2) SLR_NM_STEP(3)
#undef SLR_NM_STEP
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// Output rows [n0, n1) for mm (1..4) rows of x.
template <bool BLOCK_GROUPS>
SLR_AVX2 void nm24_rows(const float* x, int64_t mm, int64_t K, const uint8_t* vals, const uint8_t* idx,
                        const float* scale, const float* sz, const int32_t* group, int64_t G, int64_t N, float* y,
                        int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) switch (mm) {
            case 1: nm24_row<1, BLOCK_GROUPS>(x, K, vals, idx, scale, sz, group, G, N, y, n); break;
            case 2: nm24_row<2, BLOCK_GROUPS>(x, K, vals, idx, scale, sz, group, G, N, y, n); break;
            case 3: nm24_row<3, BLOCK_GROUPS>(x, K, vals, idx, scale, sz, group, G, N, y, n); break;
            default: nm24_row<4, BLOCK_GROUPS>(x, K, vals, idx, scale, sz, group, G, N, y, n); break;
        }
}

SLR_AVX2 void nm24_run(const float* x, int64_t M, int64_t K, const uint8_t* vals, const uint8_t* idx,
                       const float* scale, const float* sz, int64_t gs, int64_t N, float* y, int64_t n0, int64_t n1) {
    std::vector<int32_t> group(K / 16);
    for (int64_t c = 0; c < K / 16; ++c) group[c] = static_cast<int32_t>(16 * c / gs);
    const int32_t* gp = group.data();
    const int64_t G = K / gs;
    const std::vector<float> xp = nm24_permute_x(x, M, K);
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const float* xm = xp.data() + m0 * K;
        float* ym = y + m0 * N;
        if (gs % 64 == 0)
            nm24_rows<true>(xm, mm, K, vals, idx, scale, sz, gp, G, N, ym, n0, n1);
        else
            nm24_rows<false>(xm, mm, K, vals, idx, scale, sz, gp, G, N, ym, n0, n1);
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
    const std::vector<float> xp = nm24_permute_x(x, M, K);
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const float* xm = xp.data() + m0 * K;
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

// ---- 2-, 3- and 8-bit codes at their own width ("lanes"), and one layer in one call ---------------------------------
//
// A lane-packed S holds codes in blocks of 64 consecutive inputs of a row; code 8 J + i of a block (J, i = 0..7) is
// field J of lane i, so that field J of the 8 lanes lines up with inputs 8 J .. 8 J + 7 (slr.lowbit.lane_codes):
//   2-bit: 16 bytes a block, the little-endian uint16 word i holds field J in bits 2 J .. 2 J + 1
//   3-bit: 24 bytes a block, the little-endian 3-byte word i (bytes 3 i .. 3 i + 2) holds it in bits 3 J .. 3 J + 2
//   8-bit: 64 bytes a block, byte 8 J + i (the plain row-major codes)
// K and g are multiples of 64; each group has a float16 scale and a zero point (LArgs). 2 bits read their weights
// from a table (lanes_lut), as do 3 bits for two or more rows of x; one row of x with 3 or 8 bits goes as the 4-bit
// kernel: sums of code * x per group (scaled once, the zero part from the group sums of x); 8 bits with more rows
// rebuild each weight exactly.

// A lane-packed S's groups: float16 scales, and zero points (uint8, or one constant zc on a symmetric grid). Each
// weight is (code - zero) scale = fma(code, scale, -scale zero), exact in float32 (an fp16 value times an integer).
struct LArgs {
    const float* x;
    int64_t K;
    const uint8_t* w;
    const uint16_t* hs;
    const uint8_t* zero;
    float zc;
    int64_t gs;
    int64_t N;
    float* y;
    const float* xs;
    SLR_F16 float s(int64_t i) const { return _cvtsh_ss(hs[i]); }
    float z(int64_t i) const { return zero ? static_cast<float>(zero[i]) : zc; }
    SLR_F16 float sz(int64_t i) const { return s(i) * z(i); }
};

template <int B>
SLR_AVX2 inline __m256i lanes(const uint8_t* p) {
    if (B == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    if (B == 3) {  // bytes 0..15 and 8..23: lanes 0-3 from the first half, 4-7 from the second (no read past 24)
        const __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)), 1);
        const __m256i sh = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                            4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
        return _mm256_shuffle_epi8(v, sh);
    }
    return _mm256_setzero_si256();  // 8-bit: each field is loaded on its own
}

// Field J of the 8 lanes (the codes of inputs 8 J .. 8 J + 7 of the block at p) as floats.
template <int B, int J>
SLR_AVX2 inline __m256 field(__m256i v, const uint8_t* p) {
    if (B == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * J))));
    if (J == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, B * J));  // the top field: nothing above it
    const __m256i m = _mm256_set1_epi32((1 << B) - 1);
    if (J == 0) return _mm256_cvtepi32_ps(_mm256_and_si256(v, m));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, B * J), m));
}

#define SLR_FIELDS(STEP) STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)

// Output rows n .. n + R - 1 for one row of x (group sums; a.xs holds the sums of x over each group).
template <int B, int R>
SLR_F16 __attribute__((noinline)) void lanes_sums(const LArgs& a, int64_t n) {
    const int64_t G = a.K / a.gs, per_group = a.gs / 64, row = a.K / 8 * B;
    __m256 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 acc[R][2];
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            const uint8_t* p[R];
            __m256i v[R];
            for (int r = 0; r < R; ++r) {
                p[r] = a.w + (n + r) * row + 8 * B * b;
                if (((8 * B * b) & 63) < 8 * B && n + 2 * R < a.N)  // about once per cache line
                    _mm_prefetch(reinterpret_cast<const char*>(p[r] + 2 * R * row), _MM_HINT_T0);
                v[r] = lanes<B>(p[r]);
            }
            const float* xb = a.x + 64 * b;
#define SLR_LSTEP(J)                                                                        \
    {                                                                                       \
        const __m256 xv = _mm256_loadu_ps(xb + 8 * J);                                      \
        for (int r = 0; r < R; ++r)                                                         \
            acc[r][J & 1] = _mm256_fmadd_ps(field<B, J>(v[r], p[r]), xv, acc[r][J & 1]);    \
    }
            SLR_FIELDS(SLR_LSTEP)
#undef SLR_LSTEP
        }
        for (int r = 0; r < R; ++r)
            tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(a.s((n + r) * G + g)), _mm256_add_ps(acc[r][0], acc[r][1]),
                                     tot[r]);
    }
    for (int r = 0; r < R; ++r) {
        float zs = 0.f;
        for (int64_t g = 0; g < G; ++g) zs += a.sz((n + r) * G + g) * a.xs[g];
        a.y[n + r] = hsum(tot[r]) - zs;
    }
}

// Output row n for M rows of x: each weight rebuilt as fma(code, scale, -sz), shared by the rows.
template <int B, int M>
SLR_F16 __attribute__((noinline)) void lanes_dequant(const LArgs& a, int64_t n) {
    const int64_t K = a.K, G = K / a.gs, per_group = a.gs / 64, row = K / 8 * B;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const __m256 s = _mm256_set1_ps(a.s(n * G + g)), nz = _mm256_set1_ps(-a.sz(n * G + g));
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            const uint8_t* p = a.w + n * row + 8 * B * b;
            if (((8 * B * b) & 63) < 8 * B && n + 2 < a.N) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * row), _MM_HINT_T0);
            const __m256i v = lanes<B>(p);
            const float* xb = a.x + 64 * b;
#define SLR_LSTEP(J)                                                                        \
    {                                                                                       \
        const __m256 wv = _mm256_fmadd_ps(field<B, J>(v, p), s, nz);                        \
        for (int m = 0; m < M; ++m)                                                         \
            acc[m][J & 1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + m * K + 8 * J), acc[m][J & 1]); \
    }
            SLR_FIELDS(SLR_LSTEP)
#undef SLR_LSTEP
        }
    }
    for (int m = 0; m < M; ++m) a.y[m * a.N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// 2- and 3-bit codes: output rows n .. n + R - 1 for M rows of x, through a table. Each group's 8 weights
// fma(c, scale, -sz) (c = 0..7; for 2 bits 0..3 twice) sit in one register, and a lane permute by the shifted lane
// word picks each weight: the permute reads only the index's low bits, so no mask. The weights are the rebuilt ones,
// exactly; one instruction replaces the mask and the int-to-float conversion. 2 bits pick within each 128-bit half
// (the in-lane permute reads 2 bits; each half holds the 4 weights), 3 bits across the register (3 bits); on AMD's
// Zen 3 the in-lane permute costs less than the lane-crossing one.
template <int B>
SLR_AVX2 inline __m256 pick(__m256 t, __m256i i) {
    return B == 2 ? _mm256_permutevar_ps(t, i) : _mm256_permutevar8x32_ps(t, i);
}

template <int B, int R, int M>
SLR_F16 __attribute__((noinline)) void lanes_lut(const LArgs& a, int64_t n) {
    const int64_t K = a.K, G = K / a.gs, per_group = a.gs / 64, row = K / 8 * B;
    const __m256 iota = B == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3) : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[R][M][2];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256 t[R];
        for (int r = 0; r < R; ++r)
            t[r] = _mm256_mul_ps(_mm256_sub_ps(iota, _mm256_set1_ps(a.z((n + r) * G + g))),
                                 _mm256_set1_ps(a.s((n + r) * G + g)));  // (c - zero) scale: exact
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m256i v[R];
            for (int r = 0; r < R; ++r) {
                const uint8_t* p = a.w + (n + r) * row + 8 * B * b;
                if (((8 * B * b) & 63) < 8 * B && n + 2 * R < a.N)  // about once per cache line
                    _mm_prefetch(reinterpret_cast<const char*>(p + 2 * R * row), _MM_HINT_T0);
                v[r] = lanes<B>(p);
            }
            const float* xb = a.x + 64 * b;
#define SLR_TSTEP(J)                                                                                        \
    {                                                                                                       \
        __m256 wv[R];                                                                                       \
        for (int r = 0; r < R; ++r)                                                                         \
            wv[r] = pick<B>(t[r], J ? _mm256_srli_epi32(v[r], B * J) : v[r]);                               \
        for (int m = 0; m < M; ++m) {                                                                       \
            const __m256 xv = _mm256_loadu_ps(xb + m * K + 8 * J);                                          \
            for (int r = 0; r < R; ++r) acc[r][m][J & 1] = _mm256_fmadd_ps(wv[r], xv, acc[r][m][J & 1]);    \
        }                                                                                                   \
    }
            SLR_FIELDS(SLR_TSTEP)
#undef SLR_TSTEP
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) a.y[m * a.N + n + r] = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
}

template <int B>
SLR_F16 void lanes_run(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* hs,
                       const uint8_t* zero, float zc, int64_t gs, int64_t N, float* y, int64_t n0, int64_t n1) {
    const int64_t G = K / gs;
    std::vector<float> xs(G);
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        const LArgs a{x + m0 * K, K, w, hs, zero, zc, gs, N, y + m0 * N, xs.data()};
        int64_t n = n0;
        // Chosen by measurement (benchmarks/tuning.md, "Lane kernels"): the table for 2 bits, and for 3 bits with two
        // or more rows of x (within 3% of rebuilding each weight); one row of 3-bit codes sums code * x per group.
        if constexpr (B != 8) {
            if (B == 2 || mm > 1) {
                switch (mm) {
                    case 1:
                        for (; n + 2 <= n1; n += 2) lanes_lut<B, 2, 1>(a, n);
                        for (; n < n1; ++n) lanes_lut<B, 1, 1>(a, n);
                        break;
                    case 2: for (; n < n1; ++n) lanes_lut<B, 1, 2>(a, n); break;
                    case 3: for (; n < n1; ++n) lanes_lut<B, 1, 3>(a, n); break;
                    default: for (; n < n1; ++n) lanes_lut<B, 1, 4>(a, n); break;
                }
                continue;
            }
        }
        if (mm == 1) {
            for (int64_t g = 0; g < G; ++g) {
                float s = 0.f;
                for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += a.x[k];
                xs[g] = s;
            }
            for (; n + 2 <= n1; n += 2) lanes_sums<B, 2>(a, n);
            for (; n < n1; ++n) lanes_sums<B, 1>(a, n);
        } else {
            for (; n < n1; ++n) switch (mm) {
                    case 2: lanes_dequant<B, 2>(a, n); break;
                    case 3: lanes_dequant<B, 3>(a, n); break;
                    default: lanes_dequant<B, 4>(a, n); break;
                }
        }
    }
}

template <int B>
SLR_F16 void unpack_lanes_rows(int64_t K, const uint8_t* w, const uint16_t* hs, const uint8_t* zero, float zc,
                               int64_t gs, float* out, int64_t n0, int64_t n1) {
    const LArgs a{nullptr, K, w, hs, zero, zc, gs, 0, out, nullptr};
    const int64_t G = K / gs, per_group = gs / 64, row = K / 8 * B;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < G; ++g) {
            const __m256 s = _mm256_set1_ps(a.s(n * G + g)), nz = _mm256_set1_ps(-a.sz(n * G + g));
            for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
                const uint8_t* p = w + n * row + 8 * B * b;
                const __m256i v = lanes<B>(p);
                float* o = out + n * K + 64 * b;
#define SLR_LSTEP(J) _mm256_storeu_ps(o + 8 * J, _mm256_fmadd_ps(field<B, J>(v, p), s, nz));
                SLR_FIELDS(SLR_LSTEP)
#undef SLR_LSTEP
            }
        }
}

// ---- int8 activations (slr.kernels setting "q8"): one row of x, a dense S of 4-bit nibbles or 2- or 3-bit lanes -----
//
// x is quantized once per call in blocks of 64 inputs, as llama.cpp's Q8 activations are: d_b = max |x| / 127 over
// block b, q = round(x / d_b) (half to even; 0 for an all-zero block), and S reads x^ = q d_b:
//   y[n] = sum_b scale[n, g(b)] d_b sum_{k in b} code[n, k] q[k]  -  sum_g sz[n, g] sum_{k in g} x^[k]
// The code sums are exact integer dot products: unsigned codes times signed bytes with pairs added into 16 bits
// (maddubs: at most 2 * 15 * 127 per pair), then into 32 bits (madd); about a third of the float path's instructions
// per weight (no int-to-float conversion, 32 products an instruction). slr.packed's torch path computes x^ S^T from
// the same x^, so only the summation order differs. The low-rank part and the bias read x unquantized.
//
// q holds each block's 64 bytes in the order the layout's codes come out of two shift-and-mask steps, so that code
// and input meet lane for lane with no shuffle in the loop (q8_input):
//   4 bits (a 64-input block = two 32-code blocks, 32 bytes): v & 15 gives, per 128-bit half h (code block h),
//      byte 2 i -> input 32 h + i and byte 2 i + 1 -> 32 h + 16 + i; (v >> 4) & 15 the same at + 8
//   2 bits (16 bytes, loaded into both halves): half h of (v >> 2 (2 s + h)) & 3, s = 0, 1, holds field 2 s + h of
//      lane i in byte 2 i (input 8 (2 s + h) + i) and field 2 s + h + 4 in byte 2 i + 1 (input 8 (2 s + h + 4) + i);
//      q8_rows2 reads two blocks per load instead, and Q8 lays q out for it (an odd last block as here)
//   3 bits (24 bytes: bytes 0-15 in the low half, 8-23 in the high one, as lanes<3> loads them): four byte shuffles
//      put in 16-bit lane l of vector k, half h, the two bytes that hold field J = 2 k + l / 4 of lane i = 4 h + l % 4;
//      a multiply by 2^(13 - o) (o = 3 J mod 8, the field's offset in them) and a shift right by 13 leave the field;
//      packing vectors 0, 1 and 2, 3 into bytes gives the two code vectors (Q8Lanes3 holds the tables)

constexpr int64_t Q8_BLOCK = 64;

// The input (0..63) that byte t of a block's quantized x meets, for codes of B bits.
inline int q8_input(int B, int t) {
    const int s = t / 32, h = (t % 32) / 16, i = (t % 16) / 2, odd = t % 2;
    if (B == 8) return t;  // int8 rows: the plain order
    if (B == 4) return 32 * h + 16 * odd + 8 * s + i;
    if (B == 3) {  // byte pos of half h of pack(vector 2 s, 2 s + 1): lane pos % 8 of vector 2 s + pos / 8
        const int pos = t % 16, k = 2 * s + pos / 8, l = pos % 8;
        return 8 * (2 * k + l / 4) + 4 * h + l % 4;
    }
    const int field = 2 * s + h + 4 * odd;
    return 8 * field + i;
}

// x [K] quantized for S's kernel: q in the layout's order, d per block, and the sums of x^ over S's groups. The
// division and the rounding (half to even) are IEEE float32 operations, as in slr.packed.q8_activations.
// 2 bits: blocks 2 P and 2 P + 1 are read together (q8_rows2), so their 128 bytes hold, at 32 s + 16 h + 2 i (+ 1),
// block 2 P + h's input 8 s + i (8 (s + 4) + i); an odd last block keeps q8_input's order.
struct Q8 {
    std::vector<int8_t> q;
    std::vector<float> d, gsum;
    SLR_AVX2 Q8(const float* x, int64_t K, int64_t gs, int B) : q(K), d(K / Q8_BLOCK), gsum(K / gs, 0.f) {
        int solo[Q8_BLOCK], pair[2][Q8_BLOCK];  // the byte of input k: in its block's own span, in a 2-bit pair's
        for (int t = 0; t < Q8_BLOCK; ++t) solo[q8_input(B, t)] = t;
        for (int h = 0; h < 2; ++h)
            for (int k = 0; k < Q8_BLOCK; ++k) pair[h][k] = 32 * (k / 8 % 4) + 16 * h + 2 * (k % 8) + k / 32;
        const int64_t nb = K / Q8_BLOCK;
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (int64_t b = 0; b < nb; ++b) {
            const float* xb = x + Q8_BLOCK * b;
            __m256 amax = _mm256_setzero_ps();
            for (int k = 0; k < Q8_BLOCK; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + k)));
            __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            const float db = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / 127.f;
            d[b] = db;
            alignas(32) int32_t qi[Q8_BLOCK];
            __m256 xs = _mm256_setzero_ps();
            if (db > 0.f) {
                const __m256 dv = _mm256_set1_ps(db);
                for (int k = 0; k < Q8_BLOCK; k += 8) {
                    const __m256 qf = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + k), dv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    xs = _mm256_add_ps(xs, _mm256_mul_ps(qf, dv));
                    _mm256_store_si256(reinterpret_cast<__m256i*>(qi + k), _mm256_cvtps_epi32(qf));
                }
            } else {
                for (int k = 0; k < Q8_BLOCK; ++k) qi[k] = 0;
            }
            gsum[Q8_BLOCK * b / gs] += hsum(xs);
            const bool paired = B == 2 && (b % 2 || b + 1 < nb);
            int8_t* dst = q.data() + Q8_BLOCK * (paired ? b - b % 2 : b);
            const int* place = paired ? pair[b % 2] : solo;
            for (int k = 0; k < Q8_BLOCK; ++k) dst[place[k]] = static_cast<int8_t>(qi[k]);
        }
    }
};

// S's codes and groups for the int8 kernel: B = 4 (nibbles, float32 scale and sz) or 2, 3 (lanes, float16 scales
// and zero points or the constant zc).
template <int B>
struct Q8S {
    const uint8_t* w;
    const float* scale;
    const float* sz;
    const uint16_t* hs;
    const uint8_t* zero;
    float zc;
    SLR_F16 float s(int64_t i) const { return B == 4 ? scale[i] : _cvtsh_ss(hs[i]); }
    SLR_F16 float szv(int64_t i) const {
        return B == 4 ? sz[i] : _cvtsh_ss(hs[i]) * (zero ? static_cast<float>(zero[i]) : zc);
    }
};

// The 3-bit extraction's byte shuffles and multipliers (see the top of this section).
struct Q8Lanes3 {
    alignas(32) int8_t shuf[4][32];
    alignas(32) int16_t mul[4][16];
    Q8Lanes3() {
        for (int k = 0; k < 4; ++k)
            for (int h = 0; h < 2; ++h)
                for (int l = 0; l < 8; ++l) {
                    const int J = 2 * k + l / 4, i = 4 * h + l % 4, o = 3 * J % 8;
                    const int b0 = 3 * i + 3 * J / 8 - 8 * h;  // the field's first byte in the half
                    shuf[k][16 * h + 2 * l] = static_cast<int8_t>(b0);
                    shuf[k][16 * h + 2 * l + 1] = static_cast<int8_t>(o + 3 > 8 ? b0 + 1 : -1);
                    mul[k][8 * h + l] = static_cast<int16_t>(1 << (13 - o));
                }
    }
};
const Q8Lanes3 Q8_LANES3;

// The two code vectors (unsigned bytes) of block b of the row at p, in q8_input's order.
template <int B>
SLR_AVX2 inline void q8_codes(const uint8_t* p, __m256i& lo, __m256i& hi) {
    if (B == 3) {
        const __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)), 1);
        __m256i f[4];
        for (int k = 0; k < 4; ++k) {
            const __m256i b = _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(Q8_LANES3.shuf[k])));
            f[k] = _mm256_srli_epi16(
                _mm256_mullo_epi16(b, _mm256_load_si256(reinterpret_cast<const __m256i*>(Q8_LANES3.mul[k]))), 13);
        }
        lo = _mm256_packus_epi16(f[0], f[1]);
        hi = _mm256_packus_epi16(f[2], f[3]);
        return;
    }
    if (B == 4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(15);
        lo = _mm256_and_si256(v, m);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    } else {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i m = _mm256_set1_epi8(3);
        lo = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m);
        hi = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m);
    }
}

// The sums of code * q of one 64-input block in 8 int32 lanes, as floats (lo, hi: q8_codes; xa, xb: q's 64 bytes).
SLR_AVX2 inline __m256 q8_dot(__m256i lo, __m256i hi, __m256i xa, __m256i xb) {
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}

// y[n + r] = the scaled code sums tot[r] minus the zero part, sum_g sz[n + r, g] sum_{k in g} x^[k].
template <int B, int R>
SLR_F16 inline void q8_store(const Q8S<B>& a, const Q8& x, int64_t G, const __m256* tot, float* y, int64_t n) {
    for (int r = 0; r < R; ++r) {
        float zs = 0.f;
        for (int64_t g = 0; g < G; ++g) zs += a.szv((n + r) * G + g) * x.gsum[g];
        y[n + r] = hsum(tot[r]) - zs;
    }
}

// Output rows n .. n + R - 1.
template <int B, int R>
SLR_F16 __attribute__((noinline)) void q8_rows(const Q8S<B>& a, const Q8& x, int64_t K, int64_t gs, float* y,
                                               int64_t n) {
    const int64_t G = K / gs, per_group = gs / Q8_BLOCK, row = K / 8 * B, bb = Q8_BLOCK / 8 * B;
    __m256 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        float ws[R];
        for (int r = 0; r < R; ++r) ws[r] = a.s((n + r) * G + g);
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b));
            const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b + 32));
            const float db = x.d[b];
            for (int r = 0; r < R; ++r) {
                const uint8_t* p = a.w + (n + r) * row + bb * b;
                if (bb * b % 64 < bb) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * R * row), _MM_HINT_T0);
                __m256i lo, hi;
                q8_codes<B>(p, lo, hi);
                tot[r] = _mm256_fmadd_ps(q8_dot(lo, hi, xa, xb), _mm256_set1_ps(ws[r] * db), tot[r]);
            }
        }
    }
    q8_store<B, R>(a, x, G, tot, y, n);
}

// 2 bits, output rows n .. n + R - 1: two blocks per load (block 2 P in the low half, 2 P + 1 in the high one), four
// shifts of it by 2 s give field s and s + 4 of every lane (Q8's pair order); a block's scale in its four int32 sums.
template <int R>
SLR_F16 __attribute__((noinline)) void q8_rows2(const Q8S<2>& a, const Q8& x, int64_t K, int64_t gs, float* y,
                                                int64_t n) {
    const int64_t G = K / gs, per_group = gs / Q8_BLOCK, row = K / 4, nb = K / Q8_BLOCK;
    const __m256i ones = _mm256_set1_epi16(1), m = _mm256_set1_epi8(3);
    __m256 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b + 1 < nb; b += 2) {
        __m256i xv[4];
        for (int s = 0; s < 4; ++s)
            xv[s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b + 32 * s));
        const float d0 = x.d[b], d1 = x.d[b + 1];
        const int64_t g0 = b / per_group, g1 = (b + 1) / per_group;
        for (int r = 0; r < R; ++r) {
            const uint8_t* p = a.w + (n + r) * row + 16 * b;
            if (b % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * R * row), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            __m256i s16 = _mm256_maddubs_epi16(_mm256_and_si256(v, m), xv[0]);
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m), xv[1]));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), xv[2]));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m), xv[3]));
            const __m256 f = _mm256_set_m128(_mm_set1_ps(a.s((n + r) * G + g1) * d1),
                                             _mm_set1_ps(a.s((n + r) * G + g0) * d0));
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), f, tot[r]);
        }
    }
    if (nb % 2) {  // the odd last block, as q8_rows reads it
        const int64_t b = nb - 1;
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b));
        const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b + 32));
        for (int r = 0; r < R; ++r) {
            __m256i lo, hi;
            q8_codes<2>(a.w + (n + r) * row + 16 * b, lo, hi);
            tot[r] = _mm256_fmadd_ps(q8_dot(lo, hi, xa, xb), _mm256_set1_ps(a.s((n + r) * G + b / per_group) * x.d[b]),
                                     tot[r]);
        }
    }
    q8_store<2, R>(a, x, G, tot, y, n);
}

template <int B>
SLR_F16 void q8_run(const Q8S<B>& a, const Q8& x, int64_t K, int64_t gs, float* y, int64_t n0, int64_t n1) {
    int64_t n = n0;
    if constexpr (B == 2) {
        for (; n + 4 <= n1; n += 4) q8_rows2<4>(a, x, K, gs, y, n);
        for (; n < n1; ++n) q8_rows2<1>(a, x, K, gs, y, n);
        return;
    }
    for (; n + 4 <= n1; n += 4) q8_rows<B, 4>(a, x, K, gs, y, n);
    for (; n + 2 <= n1; n += 2) q8_rows<B, 2>(a, x, K, gs, y, n);
    for (; n < n1; ++n) q8_rows<B, 1>(a, x, K, gs, y, n);
}

// int8 rows (the output head, slr.embeddings' codes in [-127, 127]) times int8 activations, output rows n .. n + R - 1
// of one row of x: y[n] = scale[n] sum_b d_b sum_{k in b} w[n, k] q[k]. |w| times q with w's sign, as unsigned by
// signed bytes (at most 2 * 127 * 127 per pair, so each product vector goes to 32 bits on its own).
template <int R>
SLR_AVX2 __attribute__((noinline)) void q8_int8_rows(const int8_t* w, const float* scale, const Q8& x, int64_t K,
                                                     int64_t N, float* y, int64_t n) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / Q8_BLOCK; ++b) {
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b));
        const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + Q8_BLOCK * b + 32));
        const __m256 db = _mm256_set1_ps(x.d[b]);
        for (int r = 0; r < R; ++r) {
            const int8_t* p = w + (n + r) * K + Q8_BLOCK * b;
            if (n + r + 2 * R < N) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * R * K), _MM_HINT_T0);
            const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
            const __m256i s = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(xa, w0)), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(xb, w1)), ones));
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), db, tot[r]);
        }
    }
    for (int r = 0; r < R; ++r) y[n + r] = hsum(tot[r]) * scale[n + r];
}

// One layer y = x (S + U V)^T + bias, described once by the caller (slr.csrc.Layer; every field 8 bytes).
//   S: skind S_NIBBLE (the 4-bit kernel's layout), S_NIBBLE_NM24 (4-bit 2:4), S_F16_NM24 (float16 2:4; no scale),
//      S_LANES2 / 3 / 8 (above); s the codes or values, idx the 2:4 positions, scale / sz [N, K / gs] float32; for
//      the lanes, scale float16 [N, K / gs] and sz the uint8 zero points [N, K / gs] or null (zero point zc);
//      S_NONE: no S (y = x (U V)^T + bias: the low-rank part next to a GEMM of the unpacked S at prefill)
//   V [r, K]: vkind F_F16 / F_F32 rows, F_U8 uint8 codes with vscale / vsz [r, K / vgs] float32 (weight
//      scale * code - sz; vgs a multiple of 8), F_I8 int8 codes with vscale only (weight scale * code: a symmetric
//      grid's code minus its zero), or F_GIVEN: no V, the caller passes z = x V^T [M, r] (a shared projection's)
//   U: blocked by 8 output rows (see lowrank_u; r x 8 ceil(N / 8) entries): ukind F_F16 / F_F32, or F_U8 / F_I8
//      codes with uscale (/ usz) [r / ugs, N] float32
//   r = 0: no low-rank part; bias null or float32 [N]
enum SKind { S_NIBBLE = 0, S_NIBBLE_NM24 = 1, S_F16_NM24 = 2, S_LANES2 = 3, S_LANES3 = 4, S_LANES8 = 5, S_NONE = 6 };
enum FKind { F_F16 = ROWS_F16, F_F32 = ROWS_F32, F_U8 = 3, F_GIVEN = 4, F_I8 = 5 };

struct Layer {
    int64_t K, N, skind, gs;
    const void* s;
    const uint8_t* idx;
    const float* scale;
    const float* sz;
    int64_t r, vkind;
    const void* v;
    const float* vscale;
    const float* vsz;
    int64_t vgs, ukind;
    const void* u;
    const float* uscale;
    const float* usz;
    int64_t ugs;
    const float* bias;
    float zc;  // lanes: the zero point of every group when sz (their zero codes) is null
    int32_t act8;  // 1: one row of x reaches a nibble or 2- or 3-bit-lane S as int8 activations (the "q8" section)
    // lanes: scale holds float16 scales, sz uint8 zero points (or null)
    const uint16_t* hscale() const { return reinterpret_cast<const uint16_t*>(scale); }
    const uint8_t* zero() const { return reinterpret_cast<const uint8_t*>(sz); }
};

// Whether the layer's S takes int8 activations (for one row of x).
bool q8_takes(const Layer& L) {
    return L.act8 && (L.skind == S_LANES2 || L.skind == S_LANES3 ||
                      (L.skind == S_NIBBLE && L.K % Q8_BLOCK == 0 && L.gs % Q8_BLOCK == 0));
}

// S's output rows [n0, n1); q8: x quantized (one row, q8_takes), else null.
SLR_F16 void s_rows(const Layer& L, const float* x, int64_t M, float* y, int64_t n0, int64_t n1, const Q8* q8) {
    const uint8_t* s = static_cast<const uint8_t*>(L.s);
    if (q8 && L.skind == S_NIBBLE)
        return q8_run<4>(Q8S<4>{s, L.scale, L.sz, nullptr, nullptr, 0.f}, *q8, L.K, L.gs, y, n0, n1);
    if (q8 && L.skind == S_LANES3)
        return q8_run<3>(Q8S<3>{s, nullptr, nullptr, L.hscale(), L.zero(), L.zc}, *q8, L.K, L.gs, y, n0, n1);
    if (q8)
        return q8_run<2>(Q8S<2>{s, nullptr, nullptr, L.hscale(), L.zero(), L.zc}, *q8, L.K, L.gs, y, n0, n1);
    switch (L.skind) {
        case S_NONE:
            for (int64_t m = 0; m < M; ++m)
                for (int64_t n = n0; n < n1; ++n) y[m * L.N + n] = 0.f;
            break;
        case S_NIBBLE: run(x, M, L.K, s, L.scale, L.sz, L.gs, L.N, y, n0, n1); break;
        case S_NIBBLE_NM24: nm24_run(x, M, L.K, s, L.idx, L.scale, L.sz, L.gs, L.N, y, n0, n1); break;
        case S_F16_NM24:
            nm24_f16_run(x, M, L.K, static_cast<const uint16_t*>(L.s), L.idx, L.N, y, n0, n1);
            break;
        case S_LANES2: lanes_run<2>(x, M, L.K, s, L.hscale(), L.zero(), L.zc, L.gs, L.N, y, n0, n1); break;
        case S_LANES3: lanes_run<3>(x, M, L.K, s, L.hscale(), L.zero(), L.zc, L.gs, L.N, y, n0, n1); break;
        default: lanes_run<8>(x, M, L.K, s, L.hscale(), L.zero(), L.zc, L.gs, L.N, y, n0, n1); break;
    }
}

// 8 consecutive entries of a factor row of `kind` at element offset o, as floats.
SLR_F16 inline __m256 factor8(int64_t kind, const void* f, int64_t o) {
    if (kind == F_I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(f) + o))));
    if (kind == F_U8)
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(f) + o))));
    if (kind == F_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(f) + o)));
    return _mm256_loadu_ps(static_cast<const float*>(f) + o);
}

SLR_F16 inline float factor1(int64_t kind, const void* f, int64_t o) {
    if (kind == F_I8) return static_cast<float>(static_cast<const int8_t*>(f)[o]);
    if (kind == F_U8) return static_cast<float>(static_cast<const uint8_t*>(f)[o]);
    if (kind == F_F16) return _cvtsh_ss(static_cast<const uint16_t*>(f)[o]);
    return static_cast<const float*>(f)[o];
}

// z [M, r] = x V^T for V's rows [j0, j1). Codes: per group, F_I8 sums code * x and scales the sum once; F_U8
// rebuilds each weight.
SLR_F16 void lowrank_z(const Layer& L, const float* x, int64_t M, float* z, int64_t j0, int64_t j1) {
    const int64_t K = L.K, r = L.r, vk = L.vkind;
    if (vk != F_U8 && vk != F_I8) {
        std::vector<float> zj((j1 - j0) * M);
        rows_run<false>(static_cast<int>(vk), x, M, K, static_cast<const char*>(L.v) + j0 * K * (vk == F_F16 ? 2 : 4),
                        nullptr, j1 - j0, zj.data(), 0, j1 - j0);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t j = j0; j < j1; ++j) z[m * r + j] = zj[m * (j1 - j0) + j - j0];
        return;
    }
    const int64_t G = K / L.vgs;
    int64_t j = j0;
    if (vk == F_I8)  // four rows of V at a time: four independent sums, x read once
        for (; j + 4 <= j1; j += 4)
            for (int64_t m = 0; m < M; ++m) {
                __m256 acc[4];
                for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_ps();
                for (int64_t g = 0; g < G; ++g) {
                    __m256 ga[4];
                    for (int q = 0; q < 4; ++q) ga[q] = _mm256_setzero_ps();
                    for (int64_t k = g * L.vgs; k < (g + 1) * L.vgs; k += 8) {
                        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
                        for (int q = 0; q < 4; ++q)
                            ga[q] = _mm256_fmadd_ps(factor8(F_I8, L.v, (j + q) * K + k), xv, ga[q]);
                    }
                    for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(ga[q], _mm256_set1_ps(L.vscale[(j + q) * G + g]), acc[q]);
                }
                for (int q = 0; q < 4; ++q) z[m * r + j + q] = hsum(acc[q]);
            }
    for (; j < j1; ++j)
        for (int64_t m = 0; m < M; ++m) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; ++g) {
                const __m256 s = _mm256_set1_ps(L.vscale[j * G + g]);
                __m256 ga = _mm256_setzero_ps();
                if (vk == F_I8) {
                    for (int64_t k = g * L.vgs; k < (g + 1) * L.vgs; k += 8)
                        ga = _mm256_fmadd_ps(factor8(F_I8, L.v, j * K + k), _mm256_loadu_ps(x + m * K + k), ga);
                    acc = _mm256_fmadd_ps(ga, s, acc);
                } else {
                    const __m256 nz = _mm256_set1_ps(-L.vsz[j * G + g]);
                    for (int64_t k = g * L.vgs; k < (g + 1) * L.vgs; k += 8)
                        acc = _mm256_fmadd_ps(_mm256_fmadd_ps(factor8(F_U8, L.v, j * K + k), s, nz),
                                              _mm256_loadu_ps(x + m * K + k), acc);
                }
            }
            z[m * r + j] = hsum(acc);
        }
}

// y[m, n] += sum_j U[n, j] z[m, j] (+ bias[n]) for rows [n0, n1). U is blocked: the r x 8 entries of output rows
// 8 c .. 8 c + 7 are contiguous (entry (n, j) at 8 r (n / 8) + 8 j + n % 8), so U streams in row order, 8 rows
// per vector. Codes are summed per group (F_I8: code * z, scaled once; F_U8: each weight rebuilt).
SLR_F16 void lowrank_u(const Layer& L, const float* z, int64_t M, float* y, int64_t n0, int64_t n1) {
    const int64_t N = L.N, r = L.r, uk = L.ukind;
    const bool q = uk == F_U8 || uk == F_I8;
    const int64_t gs = q ? L.ugs : r;
    auto at = [r](int64_t n, int64_t j) { return 8 * r * (n / 8) + 8 * j + n % 8; };
    int64_t n = n0;
    auto scalar = [&](int64_t n) {
        for (int64_t m = 0; m < M; ++m) {
            float acc = y[m * N + n];
            for (int64_t j0 = 0; j0 < r; j0 += gs) {
                float ga = 0.f;
                for (int64_t j = j0; j < j0 + gs; ++j) {
                    float w = factor1(uk, L.u, at(n, j));
                    if (uk == F_U8) w = std::fma(w, L.uscale[j0 / gs * N + n], -L.usz[j0 / gs * N + n]);
                    ga = std::fma(w, z[m * r + j], ga);
                }
                acc = uk == F_I8 ? std::fma(ga, L.uscale[j0 / gs * N + n], acc) : acc + ga;
            }
            y[m * N + n] = L.bias ? acc + L.bias[n] : acc;
        }
    };
    for (; n < n1 && n % 8; ++n) scalar(n);
    if (uk == F_I8)  // 32 rows at a time: each z broadcast feeds four independent sums
        for (; n + 32 <= n1; n += 32) {
            if (n + 96 < n1) _mm_prefetch(reinterpret_cast<const char*>(L.u) + at(n + 96, 0), _MM_HINT_T0);
            for (int64_t m = 0; m < M; ++m) {
                const float* zm = z + m * r;
                __m256 acc[4];
                for (int q = 0; q < 4; ++q) acc[q] = _mm256_loadu_ps(y + m * N + n + 8 * q);
                for (int64_t j0 = 0; j0 < r; j0 += gs) {
                    __m256 ga[4];
                    for (int q = 0; q < 4; ++q) ga[q] = _mm256_setzero_ps();
                    for (int64_t j = j0; j < j0 + gs; ++j) {
                        const __m256 zb = _mm256_set1_ps(zm[j]);
                        for (int q = 0; q < 4; ++q) ga[q] = _mm256_fmadd_ps(factor8(F_I8, L.u, at(n + 8 * q, j)), zb, ga[q]);
                    }
                    for (int q = 0; q < 4; ++q)
                        acc[q] = _mm256_fmadd_ps(ga[q], _mm256_loadu_ps(L.uscale + j0 / gs * N + n + 8 * q), acc[q]);
                }
                for (int q = 0; q < 4; ++q) {
                    if (L.bias) acc[q] = _mm256_add_ps(acc[q], _mm256_loadu_ps(L.bias + n + 8 * q));
                    _mm256_storeu_ps(y + m * N + n + 8 * q, acc[q]);
                }
            }
        }
    for (; n + 8 <= n1; n += 8) {
        if (n + 64 < n1) _mm_prefetch(reinterpret_cast<const char*>(L.u) + at(n + 64, 0) * (uk == F_F32 ? 4 : uk == F_F16 ? 2 : 1), _MM_HINT_T0);
        for (int64_t m = 0; m < M; ++m) {
            const float* zm = z + m * r;
            __m256 acc = _mm256_loadu_ps(y + m * N + n);
            for (int64_t j0 = 0; j0 < r; j0 += gs) {
                __m256 ga = _mm256_setzero_ps();
                if (uk == F_U8) {
                    const __m256 s = _mm256_loadu_ps(L.uscale + j0 / gs * N + n);
                    const __m256 nz = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(L.usz + j0 / gs * N + n));
                    for (int64_t j = j0; j < j0 + gs; ++j)
                        acc = _mm256_fmadd_ps(_mm256_fmadd_ps(factor8(F_U8, L.u, at(n, j)), s, nz),
                                              _mm256_set1_ps(zm[j]), acc);
                    continue;
                }
                for (int64_t j = j0; j < j0 + gs; ++j)
                    ga = _mm256_fmadd_ps(factor8(uk, L.u, at(n, j)), _mm256_set1_ps(zm[j]), ga);
                acc = uk == F_I8 ? _mm256_fmadd_ps(ga, _mm256_loadu_ps(L.uscale + j0 / gs * N + n), acc)
                                 : _mm256_add_ps(acc, ga);
            }
            if (L.bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(L.bias + n));
            _mm256_storeu_ps(y + m * N + n, acc);
        }
    }
    for (; n < n1; ++n) scalar(n);
}

SLR_F16 void bias_rows(const float* bias, int64_t M, int64_t N, float* y, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] += bias[n];
}

// Requests bytes [p, p + n) into the cache, one line at a time.
inline void prefetch(const char* p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
}

// -1 unless the layer's shapes and kinds are ones the kernels take.
int check_layer(const Layer& L) {
    if (L.K <= 0 || L.N < 0 || L.r < 0 || L.skind < S_NIBBLE || L.skind > S_NONE) return -1;
    if (L.skind != S_F16_NM24 && L.skind != S_NONE && (L.gs <= 0 || L.K % L.gs || !L.scale || (L.skind < S_LANES2 && !L.sz))) return -1;
    switch (L.skind) {
        case S_NIBBLE: if (L.K % 32 || L.gs % 32) return -1; break;
        case S_NIBBLE_NM24: if (L.K % 64 || L.gs % 16 || !L.idx) return -1; break;
        case S_F16_NM24: if (L.K % 64 || !L.idx) return -1; break;
        case S_NONE: break;
        default: if (L.K % 64 || L.gs % 64) return -1;
    }
    if (L.r == 0) return 0;
    const bool vq = L.vkind == F_U8 || L.vkind == F_I8, uq = L.ukind == F_U8 || L.ukind == F_I8;
    if (L.vkind < F_F16 || L.vkind > F_I8 || L.vkind == ROWS_I8) return -1;
    if (vq && (L.vgs <= 0 || L.vgs % 8 || L.K % L.vgs || !L.vscale || (L.vkind == F_U8 && !L.vsz))) return -1;
    if (L.ukind < F_F16 || L.ukind > F_I8 || L.ukind == ROWS_I8 || L.ukind == F_GIVEN) return -1;
    if (uq && (L.ugs <= 0 || L.r % L.ugs || !L.uscale || (L.ukind == F_U8 && !L.usz))) return -1;
    return 0;
}

}  // namespace

extern "C" {

// The calling convention and the weight layout; bumped whenever either changes.
int slr_int4_abi(void) { return 7; }

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

// y = x W^T for int8 rows W [N, K] with float32 row scales, x read as int8 activations row by row (the "q8"
// section; K a multiple of 64). Returns 0; -1 for shapes it does not take; -2 on a CPU without AVX2 + FMA + F16C.
int slr_rows_q8_mm(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y,
                   int threads) {
    if (M < 0 || N < 0 || K <= 0 || K % Q8_BLOCK || !scale) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    for (int64_t m = 0; m < M; ++m) {
        const Q8 q(x + m * K, K, K, 8);
        float* ym = y + m * N;
        parallel_rows(thread_count(threads, N, K / 4), N, [&](int64_t n0, int64_t n1) {
            int64_t n = n0;
            for (; n + 4 <= n1; n += 4) q8_int8_rows<4>(w, scale, q, K, N, ym, n);
            for (; n < n1; ++n) q8_int8_rows<1>(w, scale, q, K, N, ym, n);
        });
    }
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

// y [M, N] = x (S + U V)^T + bias for one layer (struct Layer above), S and the low-rank part on the same threads;
// z [M, r] = x V^T when V is F_GIVEN, else null. Returns 0; -1 for a layer or shapes it does not take; -2 on a CPU
// without AVX2 + FMA + F16C.
int slr_layer_mm(const void* layer, const float* x, int64_t M, const float* z, float* y, int threads) {
    const Layer& L = *static_cast<const Layer*>(layer);
    if (M < 0 || check_layer(L) || (L.r > 0 && (L.vkind == F_GIVEN) != (z != nullptr))) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    if (M == 0 || L.N == 0) return 0;
    const bool own_z = L.r > 0 && L.vkind != F_GIVEN;
    std::vector<Q8> q8;  // x quantized once, read by every thread
    if (M == 1 && q8_takes(L)) q8.emplace_back(x, L.K, L.gs, L.skind == S_NIBBLE ? 4 : L.skind == S_LANES3 ? 3 : 2);
    const int64_t nt = thread_count(threads, L.N, L.skind == S_NIBBLE_NM24 ? L.K / 2 : L.K);
    // each thread: the whole of z = x V^T (r K multiply-adds, a few percent of its rows of S; computing it once and
    // sharing it would need a barrier, which costs more at decode), its rows of S, then its rows of U z. The factors'
    // bytes are requested first, so that they arrive while S streams (a layer's factors are a few KB: without this
    // each one pays the memory latency that a long stream hides)
    auto body = [&](int64_t t, int64_t T) {
        const int64_t chunk = (L.N / 2 + T - 1) / T * 2;
        const int64_t n0 = t * chunk < L.N ? t * chunk : L.N, n1 = n0 + chunk < L.N ? n0 + chunk : L.N;
        std::vector<float> zs(own_z ? M * L.r : 0);
        if (L.r > 0) {
            const int64_t ub = L.ukind == F_F32 ? 4 : L.ukind == F_F16 ? 2 : 1;
            prefetch(static_cast<const char*>(L.u) + 8 * L.r * (n0 / 8) * ub, 8 * L.r * ((n1 + 7) / 8 - n0 / 8) * ub);
        }
        if (own_z) lowrank_z(L, x, M, zs.data(), 0, L.r);
        s_rows(L, x, M, y, n0, n1, q8.empty() ? nullptr : q8.data());
        if (L.r > 0) lowrank_u(L, own_z ? zs.data() : z, M, y, n0, n1);
        else if (L.bias) bias_rows(L.bias, M, L.N, y, n0, n1);
    };
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(static_cast<int>(nt))
        body(omp_get_thread_num(), omp_get_num_threads());
        return 0;
    }
#endif
    body(0, 1);
    return 0;
}

// out [N, K] float32 = the dense S of a layer (struct Layer; its low-rank part and bias are not read).
int slr_layer_unpack(const void* layer, float* out, int threads) {
    const Layer& L = *static_cast<const Layer*>(layer);
    if (check_layer(L) || L.skind == S_NONE) return -1;
    if (!slr_int4_cpu_ok()) return -2;
    const uint8_t* s = static_cast<const uint8_t*>(L.s);
    parallel_rows(thread_count(threads, L.N, L.K / 8), L.N, [&](int64_t n0, int64_t n1) {
        switch (L.skind) {
            case S_NIBBLE: unpack_int4_rows(L.K, s, L.scale, L.sz, L.gs, out, n0, n1); break;
            case S_NIBBLE_NM24: unpack_nm24_rows(L.K, s, nullptr, L.idx, L.scale, L.sz, L.gs, out, n0, n1); break;
            case S_F16_NM24:
                unpack_nm24_rows(L.K, nullptr, static_cast<const uint16_t*>(L.s), L.idx, nullptr, nullptr, 0, out, n0,
                                 n1);
                break;
            case S_LANES2: unpack_lanes_rows<2>(L.K, s, L.hscale(), L.zero(), L.zc, L.gs, out, n0, n1); break;
            case S_LANES3: unpack_lanes_rows<3>(L.K, s, L.hscale(), L.zero(), L.zc, L.gs, out, n0, n1); break;
            default: unpack_lanes_rows<8>(L.K, s, L.hscale(), L.zero(), L.zc, L.gs, out, n0, n1); break;
        }
    });
    return 0;
}

}  // extern "C"
