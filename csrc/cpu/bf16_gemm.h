// bf16 x bf16 -> fp32 GEMM tiles on AVX-512 BF16's dot-product instruction (vdpbf16ps), for
// the attention tiles when q/k/v are bf16. One instruction multiplies 32 bf16 pairs and adds
// them into 16 fp32 lanes: on this project's EPYC VMs it runs at 4x the fp32 FMA rate, and
// torch's bf16 matmul uses it, so bf16 attention computed in fp32 FMAs could not keep up with
// SDPA there. Compiled only where the build enables the instruction (fastlm/_build.py adds
// -mavx512bf16 on CPUs that have it); FASTLM_DPBF16 tells the callers.
//
// Operand layouts (k counted in bf16 pairs, "words": a 32-bit word holds elements 2t and 2t+1
// of the reduction dimension, the first in its low half, as the instruction reads them):
//   A: word (i, t) at a[i * lda + t * a_k] (a_k = 1: a row-major bf16 matrix read as words;
//      lda = 1: a matrix stored transposed, e.g. P^T from pair-interleaved rows of P)
//   B: k2 rows of n words, row stride ldb words ("VNNI": word (t, j) = B[2t][j] | B[2t+1][j] << 16)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_gemm.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <string>
#define FASTLM_DPBF16 1

namespace fastlm::bf16dot {

inline __mmask16 lanes(int n) {  // the first n of 16 lanes (n <= 0: none)
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Rows [i, i + M) of C, all n columns in blocks of 32 (two 16-lane registers per row, the
// last block masked): 2M accumulators stay in registers across the k loop.
template <int M>
inline void rows(int i, int n, int k2, const uint32_t* a, int lda, int a_k, const uint32_t* b,
                 int ldb, float* c, int ldc, bool acc) {
  for (int j = 0; j < n; j += 32) {
    const __mmask16 m0 = lanes(n - j), m1 = lanes(n - j - 16);
    __m512 c0[M], c1[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      float* cr = c + static_cast<size_t>(i + r) * ldc + j;
      c0[r] = acc ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
      c1[r] = acc ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
    }
    for (int t = 0; t < k2; ++t) {
      const uint32_t* bt = b + static_cast<size_t>(t) * ldb + j;
      const __m512bh b0 = as_bh(_mm512_maskz_loadu_epi32(m0, bt));
      const __m512bh b1 = as_bh(_mm512_maskz_loadu_epi32(m1, bt + 16));
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(
            a[static_cast<size_t>(i + r) * lda + static_cast<size_t>(t) * a_k])));
        c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);
        c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      float* cr = c + static_cast<size_t>(i + r) * ldc + j;
      _mm512_mask_storeu_ps(cr, m0, c0[r]);
      _mm512_mask_storeu_ps(cr + 16, m1, c1[r]);
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX (Intel Xeon since Sapphire Rapids): one tile instruction multiplies a 16 x 32 bf16 block
// of A by a 32 x 16 block of B into 16 x 16 fp32, ~16x the work of a vdpbf16ps. Where a CPU
// has it, the vector instructions run bf16 no faster than fp32 (one 512-bit dot-product unit
// against two FMA units) and torch's SDPA uses the tiles: bf16 attention on vdpbf16ps measured
// 0.29x SDPA's forward on such a VM. The operand layouts are the ones above (A rows of words,
// B in VNNI rows), which are what the tile loads read.
#define FASTLM_AMX 1
namespace amx {

// FASTLM_CPU_AMX set to 0, false, off or no (any case) turns the tiles off.
inline bool env_says_off(const char* env) {
  if (env == nullptr) return false;
  std::string v(env);
  for (char& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return v == "0" || v == "false" || v == "off" || v == "no";
}

// Linux hands a process the tile state only on request; FASTLM_CPU_AMX=0 turns the tiles off
// (the vector path then runs, as on CPUs without them).
inline bool ready() {
  static const bool ok = [] {
    if (env_says_off(std::getenv("FASTLM_CPU_AMX"))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes (the attention GEMMs below use 0-3 for C, 4-5 for A, 6-7
// for B; bf16_matmul.cpp all eight). Loaded for each call, or once for a Session's span: another
// library on this thread (oneDNN, under torch's matmuls) may have configured the tiles its own
// way since fastlm last ran.
inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// (the tile intrinsics are macros taking the tile's number as a literal)
#define FASTLM_AMX_C_TILE(u, acc, c, ldc) \
  do {                                     \
    if (acc) _tile_loadd(u, c, (ldc) * 4); \
    else _tile_zero(u);                    \
  } while (0)

inline thread_local bool t_session = false;

// The tiles configured once for the GEMMs of one attention tile (a few hundred cycles saved per
// call; nothing but fastlm's own code runs inside a tile).
struct Session {
  bool own;
  Session() : own(ready() && !t_session) {
    if (own) {
      configure();
      t_session = true;
    }
  }
  ~Session() {
    if (own) {
      _tile_release();
      t_session = false;
    }
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

// One block of C: rows i.. (R = 1 or 2 tiles of 16) x columns j.. (Cn = 1 or 2 tiles of 16),
// over all k2. C tiles 0-3 (row r, column t at 2 r + t), A tiles 4-5, B tiles 6-7: every tile
// loaded is used Cn or R times, and consecutive loads go to different tiles. (One A tile with
// one B tile register reloaded for each of four C tiles made every load wait for the multiply
// before it, tiles having no renaming: the tile multiplies then ran at ~half their rate.)
template <int R, int Cn>
inline void block(int i, int j, int k2, const uint32_t* a, int lda, const uint32_t* b, int ldb,
                  float* c, int ldc, bool acc) {
  float* c0 = c + static_cast<size_t>(i) * ldc + j;
  float* c1 = c0 + static_cast<size_t>(16) * ldc;
  FASTLM_AMX_C_TILE(0, acc, c0, ldc);
  if (Cn > 1) FASTLM_AMX_C_TILE(1, acc, c0 + 16, ldc);
  if (R > 1) FASTLM_AMX_C_TILE(2, acc, c1, ldc);
  if (R > 1 && Cn > 1) FASTLM_AMX_C_TILE(3, acc, c1 + 16, ldc);
  const uint32_t* a0 = a + static_cast<size_t>(i) * lda;
  for (int t = 0; t < k2; t += 16) {
    const uint32_t* bt = b + static_cast<size_t>(t) * ldb + j;
    _tile_loadd(4, a0 + t, lda * 4);
    _tile_loadd(6, bt, ldb * 4);
    if (Cn > 1) _tile_loadd(7, bt + 16, ldb * 4);
    if (R > 1) _tile_loadd(5, a0 + static_cast<size_t>(16) * lda + t, lda * 4);
    _tile_dpbf16ps(0, 4, 6);
    if (Cn > 1) _tile_dpbf16ps(1, 4, 7);
    if (R > 1) _tile_dpbf16ps(2, 5, 6);
    if (R > 1 && Cn > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c0, ldc * 4);
  if (Cn > 1) _tile_stored(1, c0 + 16, ldc * 4);
  if (R > 1) _tile_stored(2, c1, ldc * 4);
  if (R > 1 && Cn > 1) _tile_stored(3, c1 + 16, ldc * 4);
}

// Rows [0, m16) (a multiple of 16), k2 and n multiples of 16, A row-major (a_k = 1).
inline void gemm(int m16, int n, int k2, const uint32_t* a, int lda, const uint32_t* b, int ldb,
                 float* c, int ldc, bool acc) {
  const bool own = !t_session;
  if (own) configure();
  int i = 0;
  for (; i + 32 <= m16; i += 32) {
    int j = 0;
    for (; j + 32 <= n; j += 32) block<2, 2>(i, j, k2, a, lda, b, ldb, c, ldc, acc);
    if (j < n) block<2, 1>(i, j, k2, a, lda, b, ldb, c, ldc, acc);
  }
  if (i < m16) {
    int j = 0;
    for (; j + 32 <= n; j += 32) block<1, 2>(i, j, k2, a, lda, b, ldb, c, ldc, acc);
    if (j < n) block<1, 1>(i, j, k2, a, lda, b, ldb, c, ldc, acc);
  }
  if (own) _tile_release();
}

}  // namespace amx
#endif

// C (m x n, fp32) (+)= A (m x 2 k2, bf16) B (2 k2 x n, bf16); acc = false overwrites C.
inline void gemm(int m, int n, int k2, const uint32_t* a, int lda, int a_k, const uint32_t* b,
                 int ldb, float* c, int ldc, bool acc) {
  int i0 = 0;
#if defined(FASTLM_AMX)
  // whole 16-row blocks on the tiles when the k and column counts fill them (tails of a
  // sequence or of a causal diagonal stay on the vector path)
  if (a_k == 1 && m >= 16 && n % 16 == 0 && k2 % 16 == 0 && amx::ready()) {
    i0 = m - m % 16;
    amx::gemm(i0, n, k2, a, lda, b, ldb, c, ldc, acc);
  }
#endif
  row_blocks<6>(i0, m, [&](auto block, int i) {
    rows<decltype(block)::value>(i, n, k2, a, lda, a_k, b, ldb, c, ldc, acc);
  });
}

// fp32 row -> bf16 words (round to nearest even): n floats to (n + 1) / 2 words, the odd last
// one paired with 0.
inline void pack_f32(const float* src, int n, uint32_t* dst) {
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
    _mm512_storeu_si512(dst + j / 2, reinterpret_cast<const __m512i&>(v));
  }
  for (; j < n; j += 2) {
    const float lo = src[j], hi = j + 1 < n ? src[j + 1] : 0.0f;
    const __m128bh v = _mm_cvtneps_pbh(_mm_setr_ps(lo, hi, 0.0f, 0.0f));
    uint32_t w;
    std::memcpy(&w, &v, sizeof(w));
    dst[j / 2] = w;
  }
}

// Word x = a[x] | b[x] << 16 for 16 bf16 of each: the pair-interleave of two rows, in registers.
inline __m512i interleave16(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// r[i][j] <- r[j][i] for a 16 x 16 block of 32-bit words: pairs, then quads within 128-bit lanes,
// then the lanes themselves (64 shuffles).
inline void transpose16x16(__m512i r[16]) {
  __m512i a[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4 i + c], lane l: column 4 l + c of rows 4 i .. 4 i + 3
    r[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // row 4 l + c of the result: lane l of r[c], r[4 + c], ...
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    a[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    a[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    a[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    a[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = a[i];
}

// Key-major pair words of a bf16 matrix: for rows [0, 32 n16) of x (row stride ldx elements)
// and columns [0, 16 c16), dst[j * ldd + i2] = x[2 i2][j] | x[2 i2 + 1][j] << 16 (the tiles'
// A operand for a product over x's rows, e.g. P^T dO). 16 row pairs x 16 columns at a time:
// interleaved in registers, then transposed as 32-bit words.
inline void pair_words_t(const uint16_t* x, int ldx, int n16, int c16, uint32_t* dst, int ldd) {
  for (int ib = 0; ib < n16; ++ib)
    for (int jb = 0; jb < c16; ++jb) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) {
        const uint16_t* r0 = x + static_cast<size_t>(32 * ib + 2 * t) * ldx + 16 * jb;
        r[t] = interleave16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + ldx)));
      }
      transpose16x16(r);
      for (int t = 0; t < 16; ++t)
        _mm512_storeu_si512(dst + static_cast<size_t>(16 * jb + t) * ldd + 16 * ib, r[t]);
    }
}

// Two rows of bf16 (r1 may be null: zeros) interleaved into n VNNI words.
inline void interleave(const uint16_t* r0, const uint16_t* r1, int n, uint32_t* dst) {
  int c = 0;
  if (r1 != nullptr) {
    for (; c + 16 <= n; c += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c));
      _mm512_storeu_si512(dst + c, interleave16(a, b));
    }
  }
  for (; c < n; ++c)
    dst[c] = r0[c] | (r1 != nullptr ? static_cast<uint32_t>(r1[c]) << 16 : 0u);
}

}  // namespace fastlm::bf16dot
#endif
