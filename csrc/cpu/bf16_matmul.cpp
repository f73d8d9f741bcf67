// C (fp32) (+)= A B for bf16 A and B, fp32 accumulation: the fused cross-entropy's LM-head
// weight gradient, summed over row chunks (fastlm/ops/cross_entropy.py).
//
// torch has no bf16 x bf16 -> fp32 matmul on the CPU (its bf16 mm rounds the product to bf16;
// mm(..., out_dtype=float32) is CUDA-only), so accumulating chunk products exactly meant fp32
// GEMMs over fp32 copies of the operands: on AMX a quarter of the bf16 rate. Here both operands
// are packed per call into the layouts the tiles read (A as rows of bf16 pairs, B as VNNI
// pairs: "words", see bf16_gemm.h; transposed in registers when the view asks for it), and
// each thread runs 32 x 32 blocks of C through the tiles (vdpbf16ps on CPUs without AMX) into
// an L1-resident fp32 block that is added to C.
#include "cpu/bf16_matmul.h"

#include <omp.h>

#include <algorithm>
#include <memory>

#include "cpu/bf16_gemm.h"

#if defined(FASTLM_DPBF16)
namespace fastlm {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline __mmask32 first_n32(int64_t n) {
  return n >= 32 ? ~static_cast<__mmask32>(0) : n <= 0 ? 0 : (static_cast<__mmask32>(1) << n) - 1;
}

using bf16dot::interleave16;
using bf16dot::transpose16x16;

// Packed operands: 16 x 16-word tiles (1 KB, rows of 64 bytes), the unit a tile load reads,
// each contiguous (a strided tile load of a row-major matrix touched 16 lines a page apart,
// and ran at a third of this). Tile (outer, kt) at base + (outer * kts + kt) * 256 words:
// A's outer index is its row tile, B's its column tile, so the k loop of a C block walks both
// through consecutive memory.
struct Tiles {
  uint32_t* base;
  int64_t kts;      // tiles along k (pairs)
  bool k_is_col;    // A: (row, k) words; B: (k, col) words
  // the 16 words at (r, c0), c0 a multiple of 16
  uint32_t* at(int64_t r, int64_t c0) const {
    const int64_t outer = k_is_col ? r / 16 : c0 / 16, kt = k_is_col ? c0 / 16 : r / 16;
    return base + (outer * kts + kt) * 256 + (r % 16) * 16;
  }
};

// Line l of a view: `len` bf16 at src + l * ld, contiguous. The packers below write blocks of
// 16 x 16 words and zero whatever lies past the lines' ends, so the GEMM may run over the
// padding (rows, columns and k padded to whole tiles).
struct Lines {
  const uint16_t* src;
  int64_t count, len, ld;
  __m256i load16(int64_t l, int64_t x0) const {  // elements x0.. of line l, zero past the end
    if (l >= count) return _mm256_setzero_si256();
    return _mm256_maskz_loadu_epi16(static_cast<__mmask16>(first_n32(len - x0)), src + l * ld + x0);
  }
  __m512i load_words(int64_t l, int64_t p0) const {  // words p0..p0+15 of line l
    if (l >= count) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi16(first_n32(len - 2 * p0), src + l * ld + 2 * p0);
  }
};

// word (p, x) = line 2p [x] | line 2p+1 [x] << 16 for word rows [p0, p0 + 16), x < cols
void pack_pairs(const Lines& in, int64_t p0, const Tiles& dst, int64_t cols) {
  for (int64_t x0 = 0; x0 < cols; x0 += 16)
    for (int p = 0; p < 16; ++p)
      _mm512_storeu_si512(dst.at(p0 + p, x0), interleave16(in.load16(2 * (p0 + p), x0),
                                                           in.load16(2 * (p0 + p) + 1, x0)));
}

// word (x, p) = line 2p [x] | line 2p+1 [x] << 16 (the pairs transposed), word columns
// [p0, p0 + 16), x < rows
void pack_pairs_t(const Lines& in, int64_t p0, const Tiles& dst, int64_t rows) {
  __m512i r[16];
  for (int64_t x0 = 0; x0 < rows; x0 += 16) {
    for (int p = 0; p < 16; ++p)
      r[p] = interleave16(in.load16(2 * (p0 + p), x0), in.load16(2 * (p0 + p) + 1, x0));
    transpose16x16(r);
    for (int x = 0; x < 16; ++x) _mm512_storeu_si512(dst.at(x0 + x, p0), r[x]);
  }
}

// word (l, p) = word p of line l (elements 2p, 2p+1), rows [l0, l0 + 16), p < cols
void pack_words(const Lines& in, int64_t l0, const Tiles& dst, int64_t cols) {
  for (int64_t p0 = 0; p0 < cols; p0 += 16)
    for (int l = 0; l < 16; ++l) _mm512_storeu_si512(dst.at(l0 + l, p0), in.load_words(l0 + l, p0));
}

// word (p, l) = word p of line l (the words transposed), columns [l0, l0 + 16), p < rows
void pack_words_t(const Lines& in, int64_t l0, const Tiles& dst, int64_t rows) {
  __m512i r[16];
  for (int64_t p0 = 0; p0 < rows; p0 += 16) {
    for (int l = 0; l < 16; ++l) r[l] = in.load_words(l0 + l, p0);
    transpose16x16(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst.at(p0 + p, l0), r[p]);
  }
}

// Where the A tiles of a C block are: tile (half h, kt) at p + h * half + kt * kt_step words,
// its 16 rows `stride` bytes apart (packed tiles: 64; A read in place: its row pitch).
struct ASpan {
  const uint32_t* p;
  int64_t half, kt_step, stride;
};

#if defined(FASTLM_AMX)
// C block of 2 x 2 tiles (32 x 32 floats, row stride 32) = sum over kts of A tiles times B
// tiles (b0, b1: consecutive kt at +256 words).
void block_amx(const ASpan& a, const uint32_t* b0, const uint32_t* b1, int64_t kts, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const uint32_t* a1 = a.p + a.half;
  for (int64_t kt = 0; kt < kts; ++kt) {
    _tile_loadd(4, a.p + kt * a.kt_step, a.stride);
    _tile_loadd(5, a1 + kt * a.kt_step, a.stride);
    _tile_loadd(6, b0 + kt * 256, 64);
    _tile_loadd(7, b1 + kt * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

#endif

// The same block on vdpbf16ps (CPUs without AMX, or FASTLM_CPU_AMX=0): what a tile multiply
// computes, row by row: C[i][:] += A word (i, p) (broadcast) . B word row p. Each output lane
// sums over k in four interleaved chains (word p into chain p % 4), folded into a running
// total every 256 k (as a blocked GEMM adds its k-panels): one chain of k/2 roundings had ~3x
// the error of torch's fp32 GEMM at k = 300 on an EPYC and ~5x at k = 4096 (the project's rule
// allows 2x); four chains also hide the instruction's latency.
void block_vec(const ASpan& a, const uint32_t* b0, const uint32_t* b1, int64_t kts, float* c) {
  constexpr int64_t kFold = 8;  // k tiles (32 k each) between folds
  const int64_t row_words = a.stride / 4;
  const auto sum4 = [](const __m512* v) {
    return _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3]));
  };
  for (int half = 0; half < 2; ++half) {
    for (int i = 0; i < 16; ++i) {
      __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < kts; k0 += kFold) {
        __m512 c0[4], c1[4];
        for (int q = 0; q < 4; ++q) c0[q] = c1[q] = _mm512_setzero_ps();
        for (int64_t kt = k0; kt < std::min(kts, k0 + kFold); ++kt) {
          const uint32_t* ar = a.p + half * a.half + kt * a.kt_step + i * row_words;
          for (int p = 0; p < 16; ++p) {
            const __m512bh x = bf16dot::as_bh(_mm512_set1_epi32(static_cast<int>(ar[p])));
            const uint32_t* bp = b0 + kt * 256 + p * 16;
            c0[p & 3] = _mm512_dpbf16_ps(c0[p & 3], x, bf16dot::as_bh(_mm512_loadu_si512(bp)));
            c1[p & 3] = _mm512_dpbf16_ps(
                c1[p & 3], x, bf16dot::as_bh(_mm512_loadu_si512(bp + (b1 - b0))));
          }
        }
        t0 = _mm512_add_ps(t0, sum4(c0));
        t1 = _mm512_add_ps(t1, sum4(c1));
      }
      _mm512_storeu_ps(c + (half * 16 + i) * 32, t0);
      _mm512_storeu_ps(c + (half * 16 + i) * 32 + 16, t1);
    }
  }
}

// out[i][j] (+)= acc[i][j] for the rows x cols of a C block (acc row stride 32).
void add_block(const float* acc, int64_t rows, int64_t cols, float* out, int64_t ldc, bool add) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = bf16dot::lanes(static_cast<int>(std::min<int64_t>(16, cols - j)));
      float* o = out + i * ldc + j;
      __m512 v = _mm512_loadu_ps(acc + i * 32 + j);
      if (add) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), v);
      _mm512_mask_storeu_ps(o, m, v);
    }
}

}  // namespace

bool bf16_matmul_uses_amx() {
#if defined(FASTLM_AMX)
  return bf16dot::amx::ready();
#else
  return false;
#endif
}

void bf16_matmul_acc_cpu(int64_t m, int64_t n, int64_t k, MatView a, MatView b, float* c,
                         int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty product: C keeps its values, or becomes 0
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  // k in pairs, and every dimension, padded to whole tiles; C blocks are 2 x 2 tiles
  const int64_t k2 = round_up((k + 1) / 2, 16), kts = k2 / 16;
  const int64_t np = round_up(n, 32), mp = round_up(m, 32);
  const auto* bsrc = reinterpret_cast<const uint16_t*>(b.p);
  const auto* asrc = reinterpret_cast<const uint16_t*>(a.p);
  const bool b_rows = b.s1 == 1, a_rows = a.s1 == 1;
  // A row-major with whole tiles along k is read in place, 32-row blocks straight from its rows
  // (only a partial last block is copied). Not when its pitch is a multiple of 4 KiB, where a
  // tile's 16 rows would share L1 sets.
  const bool a_direct = a_rows && k % 32 == 0 && (a.s0 * 2) % 4096 != 0;
  // uninitialised: the packers write every word, padding included
  std::unique_ptr<uint32_t[]> bw(new uint32_t[k2 * np]);
  std::unique_ptr<uint32_t[]> aw(a_direct ? nullptr : new uint32_t[mp * k2]);
  const Tiles bt{bw.get(), kts, false}, at{aw.get(), kts, true};
  // B from rows of k (b row-major) or from lines of n (a transposed view); A likewise
  const Lines bl = b_rows ? Lines{bsrc, k, n, b.s0} : Lines{bsrc, n, k, b.s1};
  const Lines al = a_rows ? Lines{asrc, m, k, a.s0} : Lines{asrc, k, m, a.s1};
  const int64_t b_blocks = b_rows ? kts : np / 16;
  const int64_t a_blocks = a_direct ? 0 : a_rows ? mp / 16 : kts;
  const int64_t row_blocks = mp / 32, col_blocks = np / 32;
  const bool amx = bf16_matmul_uses_amx();
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < b_blocks; ++i) {
      if (b_rows) pack_pairs(bl, 16 * i, bt, np);
      else pack_words_t(bl, 16 * i, bt, k2);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a_blocks; ++i) {
      if (a_rows) pack_words(al, 16 * i, at, k2);
      else pack_pairs_t(al, 16 * i, at, mp);
    }
#if defined(FASTLM_AMX)
    // oneDNN shares these threads and configures the tiles its own way: set ours per call
    if (amx) bf16dot::amx::configure();  // tiles 0-3 C, 4-5 A, 6-7 B
#endif
    alignas(64) float acc[32 * 32];
    std::unique_ptr<uint32_t[]> tail;  // a partial last row block of an in-place A, packed
#pragma omp for schedule(dynamic, 1)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t rows = std::min<int64_t>(32, m - 32 * rb);
      ASpan as;
      if (!a_direct) {
        as = {aw.get() + (2 * rb) * kts * 256, kts * 256, 256, 64};
      } else if (rows == 32) {
        as = {reinterpret_cast<const uint32_t*>(asrc + 32 * rb * a.s0), 16 * a.s0 / 2, 16,
              a.s0 * 2};
      } else {
        if (!tail) tail.reset(new uint32_t[32 * k2]);
        const Lines last{asrc + 32 * rb * a.s0, rows, k, a.s0};
        const Tiles tt{tail.get(), kts, true};
        pack_words(last, 0, tt, k2);
        pack_words(last, 16, tt, k2);
        as = {tail.get(), kts * 256, 256, 64};
      }
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        const uint32_t* b0 = bw.get() + (2 * cb) * kts * 256;
        const uint32_t* b1 = b0 + kts * 256;
#if defined(FASTLM_AMX)
        if (amx) block_amx(as, b0, b1, kts, acc);
        else
#endif
          block_vec(as, b0, b1, kts, acc);
        add_block(acc, rows, std::min<int64_t>(32, n - 32 * cb), c + 32 * rb * ldc + 32 * cb, ldc,
                  accumulate);
      }
    }
#if defined(FASTLM_AMX)
    if (amx) _tile_release();
#endif
  }
}

}  // namespace fastlm
#endif  // FASTLM_DPBF16
