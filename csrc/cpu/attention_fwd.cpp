// CPU attention forward: tiles of BQ query rows stream over BK-key tiles with an online
// softmax, so the (Sq, Sk) score matrix never exists; O(BQ * BK) scratch per thread.
#include <omp.h>

#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/attention_tile.h"
#include "cpu/attention_bf16.h"

namespace fastlm {
namespace {

using namespace attn;

// Key tiles per online-softmax step: the scores of up to kSub * BK keys are computed (one
// GEMM per BK tile of K^T), then softmaxed and multiplied into V as one block, so the
// per-row work of a step (max, rescaling the accumulator, bookkeeping) and the load/store of
// the accumulator in the P V GEMM happen once per 256 keys instead of once per 64: at head
// dim 32 that per-row work was as large as the GEMMs.
constexpr int kSub = 4;

struct FwdScratch {
  std::vector<float> q, s, acc, m, l;
  explicit FwdScratch(int d) : q(BQ * d), s(BQ * BK * kSub), acc(BQ * d), m(BQ), l(BQ) {}
};

// K (transposed per tile) and V of every (sequence, kv head) in fp32, converted once before
// the query tiles run: each is read by all Sq / BQ query tiles of the Hq / Hkv heads sharing it.
// One uninitialised allocation for all of them (the loaders write every float, padding
// included): a zero-filled vector per head was a memset and a malloc per head per call.
struct KvCache {
  std::unique_ptr<float[]> data;
  std::vector<size_t> offset;  // unit u = b * heads_kv + hk: kt at offset[u], v after it
  float* kt(int64_t u) const { return data.get() + offset[u]; }
  float* v(int64_t u) const { return data.get() + offset[u] + (offset[u + 1] - offset[u]) / 2; }
};

// Online-softmax update of one row given its masked scores sr (`width` wide): turns sr into P
// and rescales the row's accumulator. Returns false when the row has seen no visible key yet.
// Not inlined: compiled on its own, with plain pointer arguments, GCC vectorises its loops (inlined
// into the tile loop it did not, and the exp is a third of the forward's arithmetic).
// mul > 0 scales the scores on the way (the bf16 path's softmax scale): max and exp see mul * s.
__attribute__((noinline)) bool softmax_row(float* __restrict sr, int width, float& m, float& l,
                                           float* __restrict acc, int d, float mul = 1.0f) {
  const float m_new = std::max(m, row_max(sr, width, kNegInf) * mul);
  if (m_new == kNegInf) {
    for (int j = 0; j < width; ++j) sr[j] = 0.0f;
    return false;
  }
  const float alpha = exp_neg(m - m_new);  // 0 on the first visible tile (m = -inf)
  const float sum = exp_neg_sub_sum(sr, width, m_new, mul);
  l = l * alpha + sum;
  m = m_new;
  if (alpha != 1.0f)
    for (int c = 0; c < d; ++c) acc[c] *= alpha;
  return true;
}

// The online-softmax update of a block's n rows (row i's masked scores at s + i * width, cols
// of them): all row maxima first, then the exponentials. Row by row, the rows' short dependent
// chains (a reduction, the exponentials that wait for it, another reduction) did not overlap:
// at 64 keys a row that was a third of the forward at S = 64. exp_row(i, max, mul) turns row i
// into P and returns its sum; zero_row(i) writes P = 0 for a row with nothing visible yet (its
// statistics stay as they are).
template <typename ExpRow, typename ZeroRow>
inline void softmax_block(const float* s, int n, int width, int cols, float* __restrict m,
                          float* __restrict l, float* __restrict acc, int d, float mul,
                          ExpRow&& exp_row, ZeroRow&& zero_row) {
  float mx[BQ];
  for (int i = 0; i < n; ++i) mx[i] = std::max(m[i], row_max(s + i * width, cols, kNegInf) * mul);
  for (int i = 0; i < n; ++i) {
    if (mx[i] == kNegInf) {
      zero_row(i);
      continue;
    }
    const float alpha = exp_neg(m[i] - mx[i]);  // 0 on the first visible tile (m = -inf)
    l[i] = l[i] * alpha + exp_row(i, mx[i]);
    m[i] = mx[i];
    if (alpha != 1.0f)
      for (int c = 0; c < d; ++c) acc[i * d + c] *= alpha;
  }
}

// softmax_block for the fp32 tiles: P replaces the scores.
__attribute__((noinline)) void softmax_rows(float* __restrict s, int n, int width, int cols,
                                            float* __restrict m, float* __restrict l,
                                            float* __restrict acc, int d) {
  softmax_block(s, n, width, cols, m, l, acc, d, 1.0f,
                [&](int i, float mx) { return exp_neg_sub_sum(s + i * width, cols, mx); },
                [&](int i) { std::fill(s + i * width, s + i * width + cols, 0.0f); });
}

// tile(b, h, i0, scratch) for every block of BQ query rows of every (sequence, head), over
// threads each with its own Scratch(head_dim). Dynamic: causal tiles near the diagonal's end
// cost up to Sk/BQ times more than early ones.
template <typename Scratch, typename Tile>
void for_query_tiles(const AttnParams& p, Tile&& tile) {
  const int nblk = (max_seqlen_q(p) + BQ - 1) / BQ;
  const int64_t units = static_cast<int64_t>(p.batch) * p.heads_q * nblk;
#pragma omp parallel
  {
    Scratch w(p.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int blk = static_cast<int>(u % nblk);
      const int h = static_cast<int>((u / nblk) % p.heads_q);
      const int b = static_cast<int>(u / (static_cast<int64_t>(nblk) * p.heads_q));
      if (blk * BQ < sequence(p, b).sq) tile(b, h, blk * BQ, w);
    }
  }
}

// Output rows t0.. of one head from the online softmax's accumulator and row statistics.
template <typename T>
void finish_rows(const AttnParams& p, T* out, float* lse, int b, int h, int64_t t0, int n,
                 const float* acc, const float* m, const float* l) {
  const int d = p.head_dim;
  for (int i = 0; i < n; ++i) {
    T* o = row(out, p.o, b, h, t0 + i);
    float* lrow = lse + b * p.lse.b + h * p.lse.h + (t0 + i) * p.lse.t;
    if (l[i] == 0.0f) {  // saw no key: 0 out, +inf lse so the backward's P is exactly 0
      for (int c = 0; c < d; ++c) o[c] = from_float<T>(0.0f);
      *lrow = std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.0f / l[i];
    for (int c = 0; c < d; ++c) o[c] = from_float<T>(acc[i * d + c] * inv);
    *lrow = m[i] + std::log(l[i]);
  }
}

template <typename T>
void fwd_tile(const AttnParams& p, const T* q, const KvCache& kv, T* out, float* lse, int b, int h,
              int i0, FwdScratch& w) {
  const int d = p.head_dim;
  const Seq s = sequence(p, b);
  const int n = std::min(BQ, s.sq - i0);
  const int hk = h / (p.heads_q / p.heads_kv);
  const bool* kpm = p.key_padding_mask ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen_k
                                       : nullptr;
  // The scale is folded into q once per row instead of into every score.
  load_rows(q, p.q, b, h, s.q0 + i0, n, d, w.q.data(), p.scale);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const float* kt = kv.kt(b * p.heads_kv + hk);
  const float* vv = kv.v(b * p.heads_kv + hk);
  const int jlo = key_range(p, s, i0).lo, jhi = key_range(p, s, i0 + n - 1).hi;
  for (int j0 = jlo - jlo % BK; j0 < jhi; j0 += kSub * BK) {
    const int nsub = std::min(kSub, (jhi - j0 + BK - 1) / BK);  // BK tiles in this step
    const int width = nsub * BK;
    // keys [j0, j0 + vis) are the only ones a row of this block can see in this step
    const int vis = std::min({width, s.sk - j0, jhi - j0});
    const int cols = (nsub - 1) * BK + visible_cols(vis - (nsub - 1) * BK);
    for (int t = 0; t < nsub; ++t) {  // S = Q K^T, tile t of d x BK floats of K^T per BK keys
      const float* ktile = kt + static_cast<size_t>(j0 + t * BK) * d;
      gemm(n, std::min(BK, cols - t * BK), d, w.q.data(), d, 1, ktile, BK,
           w.s.data() + t * BK, width, false);
    }
    for (int i = 0; i < n; ++i) {
      float* sr = &w.s[i * width];
      const Range r = key_range(p, s, i0 + i);
      for (int t = 0; t < nsub; ++t)
        mask_row(p, sr + t * BK, j0 + t * BK, std::min(BK, s.sk - j0 - t * BK), r, kpm, nullptr);
    }
    softmax_rows(w.s.data(), n, width, cols, w.m.data(), w.l.data(), w.acc.data(), d);
    const float* vtile = vv + static_cast<size_t>(j0) * d;
    gemm(n, d, vis, w.s.data(), width, 1, vtile, d, w.acc.data(), d, true);  // acc += P V
  }
  finish_rows(p, out, lse, b, h, s.q0 + i0, n, w.acc.data(), w.m.data(), w.l.data());
}

#if defined(FASTLM_DPBF16)
// bf16 inputs on vdpbf16ps: Q, K and V stay bf16 (as 32-bit words of element pairs, see
// bf16_gemm.h), P is rounded to bf16 for the P V product as FlashAttention does on GPUs, and
// everything else (scores, softmax, accumulator) is fp32. The scale multiplies the fp32 scores
// (folded into bf16 q it would add a rounding).
struct KvWords {
  std::unique_ptr<uint32_t[]> data;
  std::vector<size_t> kt_at, v_at;  // per unit: K^T tiles (d2 x BK words each), V word pairs
};

struct FwdScratchBf16 {
#if defined(FASTLM_AMX)
  // the tiles configured once per thread for all its query tiles (the Session in
  // fwd_tile_bf16 then owns nothing): loading the configuration for each tile was ~1.5% of
  // a short sequence's forward
  bf16dot::amx::Session tiles;
#endif
  std::vector<uint32_t> q, pw;
  std::vector<float> s, acc, m, l;
  explicit FwdScratchBf16(int d)
      : q(BQ * ((d + 1) / 2)), pw(BQ * BK * kSub / 2), s(BQ * BK * kSub), acc(BQ * d), m(BQ),
        l(BQ) {}
};

// softmax_block for the bf16 tiles, with the bf16-grade exponential (exp_p_bf16): P goes
// straight to bf16 words (the P V GEMM's A operand, row stride width / 2 words) in that pass.
__attribute__((noinline)) void softmax_rows_bf16(const float* __restrict s, int n, int width,
                                                 int cols, float* __restrict m,
                                                 float* __restrict l, float* __restrict acc,
                                                 int d, float mul, uint32_t* __restrict pw) {
  auto prow = [&](int i) { return pw + static_cast<size_t>(i) * (width / 2); };
  softmax_block(s, n, width, cols, m, l, acc, d, mul,
                [&](int i, float mx) {
                  return exp_p_bf16<true>(s + i * width, cols, mx, mul, nullptr, prow(i));
                },
                [&](int i) { std::memset(prow(i), 0, sizeof(uint16_t) * cols); });
}

void fwd_tile_bf16(const AttnParams& p, const bf16* q, const KvWords& kv, bf16* out, float* lse,
                   int b, int h, int i0, FwdScratchBf16& w) {
  const int d = p.head_dim, d2 = (d + 1) / 2;
#if defined(FASTLM_AMX)
  const bf16dot::amx::Session tiles;  // configured once for this tile's GEMMs
#endif
  const Seq s = sequence(p, b);
  const int n = std::min(BQ, s.sq - i0);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t u = static_cast<int64_t>(b) * p.heads_kv + hk;
  const bool* kpm = p.key_padding_mask ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen_k
                                       : nullptr;
  load_words_rows(p, q, p.q, b, h, s.q0 + i0, n, w.q.data());
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const uint32_t* kt = kv.data.get() + kv.kt_at[u];
  const uint32_t* vw = kv.data.get() + kv.v_at[u];
  const int jlo = key_range(p, s, i0).lo, jhi = key_range(p, s, i0 + n - 1).hi;
  for (int j0 = jlo - jlo % BK; j0 < jhi; j0 += kSub * BK) {
    const int nsub = std::min(kSub, (jhi - j0 + BK - 1) / BK);
    const int width = nsub * BK;
    const int vis = std::min({width, s.sk - j0, jhi - j0});
    const int cols = (nsub - 1) * BK + visible_cols(vis - (nsub - 1) * BK);
    for (int t = 0; t < nsub; ++t)
      bf16dot::gemm(n, std::min(BK, cols - t * BK), d2, w.q.data(), d2, 1,
                    kt + static_cast<size_t>(j0 / BK + t) * d2 * BK, BK, w.s.data() + t * BK,
                    width, false);
    const int vis2 = (vis + 1) / 2;
    // without soft-capping the scale goes into the softmax's max and exp (masks are -inf anyway)
    const bool fold = p.softcap <= 0.0f && p.scale > 0.0f;
    for (int i = 0; i < n; ++i) {
      float* sr = &w.s[i * width];
      if (!fold)
        for (int j = 0; j < cols; ++j) sr[j] *= p.scale;
      const Range r = key_range(p, s, i0 + i);
      for (int t = 0; t < nsub; ++t)
        mask_row(p, sr + t * BK, j0 + t * BK, std::min(BK, s.sk - j0 - t * BK), r, kpm, nullptr);
    }
    // P in bf16 (columns past vis are 0; cols >= 2 * vis2: a multiple of 16 >= vis)
    softmax_rows_bf16(w.s.data(), n, width, cols, w.m.data(), w.l.data(), w.acc.data(), d,
                      fold ? p.scale : 1.0f, w.pw.data());
    bf16dot::gemm(n, d, vis2, w.pw.data(), width / 2, 1, vw + static_cast<size_t>(j0 / 2) * d, d,
                  w.acc.data(), d, true);  // acc += P V
  }
  finish_rows(p, out, lse, b, h, s.q0 + i0, n, w.acc.data(), w.m.data(), w.l.data());
}

void fwd_bf16(const AttnParams& p, const bf16* q, const bf16* k, const bf16* v, bf16* out,
              float* lse) {
  const int64_t nkv = static_cast<int64_t>(p.batch) * p.heads_kv;
  const int d = p.head_dim;
  KvWords kv;
  kv.kt_at.resize(nkv);
  kv.v_at.resize(nkv);
  size_t total = 0;
  for (int64_t u = 0; u < nkv; ++u) {
    const int sk = sequence(p, static_cast<int>(u / p.heads_kv)).sk;
    kv.kt_at[u] = total;
    kv.v_at[u] = total + words_t_size(sk, d);
    total += words_t_size(sk, d) + words_vnni_size(sk, d);
  }
  kv.data.reset(new uint32_t[std::max<size_t>(1, total)]);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < nkv; ++u) {
    const int b = static_cast<int>(u / p.heads_kv), hk = static_cast<int>(u % p.heads_kv);
    const Seq s = sequence(p, b);
    load_words_t(p, k, p.k, b, hk, s.k0, s.sk, kv.data.get() + kv.kt_at[u]);
    load_words_vnni(p, v, p.v, b, hk, s.k0, s.sk, kv.data.get() + kv.v_at[u]);
  }
  for_query_tiles<FwdScratchBf16>(p, [&](int b, int h, int i0, FwdScratchBf16& w) {
    fwd_tile_bf16(p, q, kv, out, lse, b, h, i0, w);
  });
}
#endif

// Few query rows per sequence (decoding: new tokens against a KV cache): a converted K/V tile
// would serve too few rows to pay for converting the whole cache first (at one row per head
// that conversion was most of a decode step's attention time, and it grows with the cache),
// so each query row reads the rows of K and V in place (from cache for a head's later rows),
// converted in registers when they are not fp32.
constexpr int kDirectMaxRows = 8;
constexpr int kChunk = kSub * BK;  // keys per online-softmax step
constexpr int64_t kDirectParallelMin = 1 << 15;  // rows x keys x head dim (measured crossover, 2 cores)

#if defined(FASTLM_DPBF16)
constexpr bool kDirectDpbf16 = true;
#else
constexpr bool kDirectDpbf16 = false;
#endif

struct DirectScratch {
  std::vector<float> q, s, acc, m, l;
  std::vector<bf16> qb;  // raw bf16 q rows (vdpbf16ps scores)
  explicit DirectScratch(int d)
      : q(kDirectMaxRows * d), s(kDirectMaxRows * kChunk), acc(kDirectMaxRows * d),
        m(kDirectMaxRows), l(kDirectMaxRows), qb(kDirectMaxRows * d) {}
};

template <typename T>
inline float dot_row(const float* a, const T* b, int d) {
  using simd::W;
  simd::vf s0 = simd::splat(0.0f), s1 = simd::splat(0.0f);
  int c = 0;
  for (; c + 2 * W <= d; c += 2 * W) {
    s0 += simd::loadw(a + c) * simd::loadw(b + c);
    s1 += simd::loadw(a + c + W) * simd::loadw(b + c + W);
  }
  if (c + W <= d) {
    s0 += simd::loadw(a + c) * simd::loadw(b + c);
    c += W;
  }
  float sum = simd::hsum(s0 + s1);
  for (; c < d; ++c) sum += a[c] * to_float(b[c]);
  return sum;
}

template <typename T>
inline void axpy_row(float* acc, float x, const T* v, int d) {
  using simd::W;
  const simd::vf xv = simd::splat(x);
  int c = 0;
  for (; c + W <= d; c += W) simd::storew(acc + c, simd::loadw(acc + c) + xv * simd::loadw(v + c));
  for (; c < d; ++c) acc[c] += x * to_float(v[c]);
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight 8-lane accumulators of eight keys' dot products -> their eight sums (a horizontal-add
// transpose).
inline __m256 sum8x8(const __m256* acc) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if defined(__AVX512F__)
// The same from 16-lane accumulators: their halves added first.
inline __m256 sum8x16(const __m512* acc) {
  __m256 h[8];
  for (int t = 0; t < 8; ++t)
    h[t] = _mm256_add_ps(_mm512_castps512_ps256(acc[t]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[t]), 1)));
  return sum8x8(h);
}
#endif

// s[j] = a . row j of K, for the nk key rows at k (row stride ks): eight keys at a time, their
// eight accumulators reduced together by a horizontal-add transpose (a reduction per dot
// product cost more than the dot product's FMAs at head dim 64). 16 lanes on AVX-512.
template <typename T>
void scores_row(const float* a, const T* k, int64_t ks, int nk, int d, float* s) {
  int j = 0;
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (; j + 8 <= nk; j += 8) {
      __m512 acc[8];
      for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
      for (int c = 0; c < d; c += 16) {
        const __m512 av = _mm512_loadu_ps(a + c);
        for (int t = 0; t < 8; ++t)
          acc[t] = _mm512_fmadd_ps(av, (__m512)simd::load_lanes<16>(k + (j + t) * ks + c), acc[t]);
      }
      _mm256_storeu_ps(s + j, sum8x16(acc));
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (d % 8 == 0) {
    for (; j + 8 <= nk; j += 8) {
      __m256 acc[8];
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
      for (int c = 0; c < d; c += 8) {
        const __m256 av = _mm256_loadu_ps(a + c);
        for (int t = 0; t < 8; ++t)
          acc[t] = _mm256_fmadd_ps(av, (__m256)simd::load8(k + (j + t) * ks + c), acc[t]);
      }
      _mm256_storeu_ps(s + j, sum8x8(acc));
    }
  }
#endif
  for (; j < nk; ++j) s[j] = dot_row(a, k + j * ks, d);
}

#if defined(FASTLM_DPBF16)
// bf16 q against bf16 keys on vdpbf16ps: q stays bf16 (unscaled: the caller's softmax applies
// the scale to the fp32 scores), products are exact and sums fp32, as in the tiles' GEMMs. One
// instruction covers 32 elements of a dot product (head dim 64: two per key, against eight
// converts and FMAs on the fp32 path). Any head dim: the last block is masked.
inline void scores_row_bf16(const bf16* a, const bf16* k, int64_t ks, int nk, int d, float* s) {
  using bf16dot::as_bh;
  const int nb = (d + 31) / 32;
  const __mmask32 tail = d % 32 == 0 ? ~__mmask32{0} : (__mmask32{1} << (d % 32)) - 1;
  __m512i av[8];  // head dims up to 256 in registers; longer rows reload q per key block
  const int held = std::min(nb, 8);
  for (int b = 0; b < held; ++b)
    av[b] = _mm512_maskz_loadu_epi16(b + 1 == nb ? tail : ~__mmask32{0}, a + 32 * b);
  auto qblock = [&](int b) {
    return b < held ? av[b] : _mm512_maskz_loadu_epi16(b + 1 == nb ? tail : ~__mmask32{0}, a + 32 * b);
  };
  int j = 0;
  for (; j + 8 <= nk; j += 8) {
    __m512 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      const __mmask32 m = b + 1 == nb ? tail : ~__mmask32{0};
      const __m512bh qb = as_bh(qblock(b));
      for (int t = 0; t < 8; ++t)
        acc[t] = _mm512_dpbf16_ps(acc[t], qb, as_bh(_mm512_maskz_loadu_epi16(m, k + (j + t) * ks + 32 * b)));
    }
    _mm256_storeu_ps(s + j, sum8x16(acc));
  }
  for (; j < nk; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      const __mmask32 m = b + 1 == nb ? tail : ~__mmask32{0};
      acc = _mm512_dpbf16_ps(acc, as_bh(qblock(b)), as_bh(_mm512_maskz_loadu_epi16(m, k + j * ks + 32 * b)));
    }
    s[j] = _mm512_reduce_add_ps(acc);
  }
}
#endif

// acc (d floats) += sum_j p[j] * row j of V: the accumulator stays in registers across the
// keys (64 columns at a time on AVX2; 128 on AVX-512, as two register sets, for even and odd
// keys, to keep enough FMA chains in flight). Keys with p = 0 (masked) are skipped.
#if defined(__AVX512F__)
template <int NR, typename T>
inline void pv_cols(const float* p, const T* v, int64_t vs, int nk, float* acc) {
  __m512 r0[NR], r1[NR];
  for (int t = 0; t < NR; ++t) {
    r0[t] = _mm512_loadu_ps(acc + 16 * t);
    r1[t] = _mm512_setzero_ps();
  }
  int j = 0;
  for (; j + 2 <= nk; j += 2) {
    const T* v0 = v + j * vs;
    if (p[j] != 0.0f) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int t = 0; t < NR; ++t)
        r0[t] = _mm512_fmadd_ps(pj, (__m512)simd::load_lanes<16>(v0 + 16 * t), r0[t]);
    }
    if (p[j + 1] != 0.0f) {
      const __m512 pj = _mm512_set1_ps(p[j + 1]);
      for (int t = 0; t < NR; ++t)
        r1[t] = _mm512_fmadd_ps(pj, (__m512)simd::load_lanes<16>(v0 + vs + 16 * t), r1[t]);
    }
  }
  if (j < nk && p[j] != 0.0f) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int t = 0; t < NR; ++t)
      r0[t] = _mm512_fmadd_ps(pj, (__m512)simd::load_lanes<16>(v + j * vs + 16 * t), r0[t]);
  }
  for (int t = 0; t < NR; ++t) _mm512_storeu_ps(acc + 16 * t, _mm512_add_ps(r0[t], r1[t]));
}
#endif

template <typename T>
void pv_row(const float* p, const T* v, int64_t vs, int nk, int d, float* acc) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (int c0 = 0; c0 < d; c0 += 128) {
      float* a = acc + c0;
      const T* vc = v + c0;
      switch (std::min(128, d - c0) / 16) {  // registers per set: a compile-time count
        case 1: pv_cols<1>(p, vc, vs, nk, a); break;
        case 2: pv_cols<2>(p, vc, vs, nk, a); break;
        case 3: pv_cols<3>(p, vc, vs, nk, a); break;
        case 4: pv_cols<4>(p, vc, vs, nk, a); break;
        case 5: pv_cols<5>(p, vc, vs, nk, a); break;
        case 6: pv_cols<6>(p, vc, vs, nk, a); break;
        case 7: pv_cols<7>(p, vc, vs, nk, a); break;
        default: pv_cols<8>(p, vc, vs, nk, a); break;
      }
    }
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (d % 8 == 0) {
    for (int c0 = 0; c0 < d; c0 += 64) {
      const int nr = std::min(64, d - c0) / 8;
      __m256 r[8];
      for (int t = 0; t < nr; ++t) r[t] = _mm256_loadu_ps(acc + c0 + 8 * t);
      for (int j = 0; j < nk; ++j) {
        if (p[j] == 0.0f) continue;  // masked keys
        const __m256 pj = _mm256_set1_ps(p[j]);
        const T* vj = v + j * vs + c0;
        for (int t = 0; t < nr; ++t) r[t] = _mm256_fmadd_ps(pj, (__m256)simd::load8(vj + 8 * t), r[t]);
      }
      for (int t = 0; t < nr; ++t) _mm256_storeu_ps(acc + c0 + 8 * t, r[t]);
    }
    return;
  }
#endif
  for (int j = 0; j < nk; ++j)
    if (p[j] != 0.0f) axpy_row(acc, p[j], v + j * vs, d);
}

template <typename T>
void fwd_direct(const AttnParams& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int d = p.head_dim;
  const int64_t units = static_cast<int64_t>(p.batch) * p.heads_q;
  // Small calls (a decode step of a small model: 8 heads x 65 keys) run on the calling thread:
  // starting and joining the team took longer than the work (~40% of such a call in libgomp).
  const int64_t work = units * max_seqlen_q(p) * static_cast<int64_t>(p.seqlen_k) * d;
#pragma omp parallel if (work >= kDirectParallelMin)
  {
    // per thread, kept across calls: a decode step calls this once per layer with tiny
    // inputs, where allocating and zeroing the scratch was a sizeable part of the call
    static thread_local std::unique_ptr<DirectScratch> kept;
    if (!kept || static_cast<int>(kept->acc.size()) < kDirectMaxRows * d)
      kept = std::make_unique<DirectScratch>(d);
    DirectScratch& w = *kept;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int b = static_cast<int>(u / p.heads_q), h = static_cast<int>(u % p.heads_q);
      const Seq s = sequence(p, b);
      const int n = s.sq;
      if (n == 0) continue;
      const int hk = h / (p.heads_q / p.heads_kv);
      const bool* kpm = p.key_padding_mask
                            ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen_k
                            : nullptr;
      // bf16 on vdpbf16ps: q rows as they are, the scale applied to the fp32 scores
      constexpr bool raw_q = kDirectDpbf16 && std::is_same_v<T, bf16>;
      if constexpr (raw_q)
        for (int i = 0; i < n; ++i)
          std::memcpy(&w.qb[i * d], row(q, p.q, b, h, s.q0 + i), sizeof(bf16) * d);
      else
        load_rows(q, p.q, b, h, s.q0, n, d, w.q.data(), p.scale);  // scale folded into q
      // without soft-capping the scale goes into the softmax's max and exp (as in the tiles)
      const bool fold = raw_q && p.softcap <= 0.0f && p.scale > 0.0f;
      std::fill(w.acc.begin(), w.acc.begin() + n * d, 0.0f);
      std::fill(w.m.begin(), w.m.begin() + n, kNegInf);
      std::fill(w.l.begin(), w.l.begin() + n, 0.0f);
      bool seen[kDirectMaxRows];
      const int jlo = key_range(p, s, 0).lo, jhi = key_range(p, s, n - 1).hi;
      for (int j0 = jlo; j0 < jhi; j0 += kChunk) {
        const int nk = std::min(kChunk, jhi - j0);
        const T* kr = row(k, p.k, b, hk, s.k0 + j0);  // the chunk's keys, read in place
        for (int i = 0; i < n; ++i) {
#if defined(FASTLM_DPBF16)
          if constexpr (raw_q) {
            scores_row_bf16(&w.qb[i * d], kr, p.k.t, nk, d, &w.s[i * kChunk]);
            continue;
          }
#endif
          scores_row(&w.q[i * d], kr, p.k.t, nk, d, &w.s[i * kChunk]);
        }
        for (int i = 0; i < n; ++i) {
          float* sr = &w.s[i * kChunk];
          if (raw_q && !fold)
            for (int j = 0; j < nk; ++j) sr[j] *= p.scale;
          const Range r = key_range(p, s, i);
          for (int t = 0; t * BK < nk; ++t)
            mask_row(p, sr + t * BK, j0 + t * BK, std::min(BK, nk - t * BK), r, kpm, nullptr);
          seen[i] = softmax_row(sr, nk, w.m[i], w.l[i], &w.acc[i * d], d, fold ? p.scale : 1.0f);
        }
        const T* vr = row(v, p.v, b, hk, s.k0 + j0);
        for (int i = 0; i < n; ++i)  // acc += P V
          if (seen[i]) pv_row(&w.s[i * kChunk], vr, p.v.t, nk, d, &w.acc[i * d]);
      }
      finish_rows(p, out, lse, b, h, s.q0, n, w.acc.data(), w.m.data(), w.l.data());
    }
  }
}

template <typename T>
void fwd(const AttnParams& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  // Up to where the in-place path wins (12 heads, head dim 64, 80-1000 keys, AVX2): 8 fp32 rows
  // (the tiles' transposing conversion is their costly part), 4 rows of 16-bit inputs.
  if (max_seqlen_q(p) <= (std::is_same_v<T, float> ? kDirectMaxRows : 4))
    return fwd_direct(p, q, k, v, out, lse);
#if defined(FASTLM_DPBF16)
  if constexpr (std::is_same_v<T, bf16>) return fwd_bf16(p, q, k, v, out, lse);
#endif
  KvCache kv;
  const int64_t nkv = static_cast<int64_t>(p.batch) * p.heads_kv;
  kv.offset.resize(nkv + 1, 0);
  for (int64_t u = 0; u < nkv; ++u)
    kv.offset[u + 1] = kv.offset[u] + 2 * head_floats(sequence(p, static_cast<int>(u / p.heads_kv)).sk, p.head_dim);
  kv.data.reset(new float[std::max<size_t>(1, kv.offset[nkv])]);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < nkv; ++u) {
    const int b = static_cast<int>(u / p.heads_kv), hk = static_cast<int>(u % p.heads_kv);
    const Seq s = sequence(p, b);
    load_head_t(p, k, p.k, b, hk, s.k0, s.sk, kv.kt(u));
    load_head(p, v, p.v, b, hk, s.k0, s.sk, kv.v(u));
  }
  for_query_tiles<FwdScratch>(p, [&](int b, int h, int i0, FwdScratch& w) {
    fwd_tile(p, q, kv, out, lse, b, h, i0, w);
  });
}

}  // namespace

void attention_fwd_cpu(const AttnParams& p, DType dtype, const void* q, const void* k,
                       const void* v, void* out, float* lse) {
  switch (dtype) {
    case DType::f32:
      return fwd(p, static_cast<const float*>(q), static_cast<const float*>(k),
                 static_cast<const float*>(v), static_cast<float*>(out), lse);
    case DType::bf16:
      return fwd(p, static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                 static_cast<const bf16*>(v), static_cast<bf16*>(out), lse);
    case DType::f16:
      return fwd(p, static_cast<const fp16*>(q), static_cast<const fp16*>(k),
                 static_cast<const fp16*>(v), static_cast<fp16*>(out), lse);
  }
}

}  // namespace fastlm
