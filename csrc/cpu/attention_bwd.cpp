// CPU attention backward. P is recomputed tile by tile from the saved lse (never stored).
//
// Work unit = one (sequence, kv head): it covers every query head of the GQA group, so the
// unit alone writes its dK/dV rows and its heads' dQ rows. No atomics, no reduction across
// threads, hence bit-identical results run to run whatever the thread count. The unit's
// Q, dO, K, V are converted to fp32 once (K and V also transposed), so the inner loops are
// plain fp32 FMA streams.
#include <omp.h>

#include <type_traits>
#include <vector>

#include "cpu/attention_bf16.h"
#include "cpu/attention_tile.h"

namespace fastlm {
namespace {

using namespace attn;

// Delta_i = dO_i . O_i (the softmax backward's row term) and the saved lse of each query row of
// head h.
template <typename T>
void row_terms(const AttnParams& p, const T* dout, const T* out, const float* lse, int b, int h,
               const Seq& s, std::vector<float>& delta, std::vector<float>& lrow) {
  delta.resize(s.sq);
  lrow.resize(s.sq);
  for (int i = 0; i < s.sq; ++i) {
    const T* oi = row(out, p.o, b, h, s.q0 + i);
    const T* gi = row(dout, p.o, b, h, s.q0 + i);
    // by vectors (the scalar loop was one dependent chain of adds, with a conversion each)
    simd::vf acc = simd::splat(0.0f);
    for (int c = 0; c < p.head_dim; c += simd::W) {
      const int m = p.head_dim - c;
      acc += simd::load_n(gi + c, m) * simd::load_n(oi + c, m);
    }
    delta[i] = simd::hsum(acc);
    lrow[i] = lse[b * p.lse.b + h * p.lse.h + (s.q0 + i) * p.lse.t];
  }
}

// tile(i0, n, j0, nk) for every block of `rows` query rows and every BK-key tile it can see.
template <typename Tile>
void for_tiles(const AttnParams& p, const Seq& s, int rows, Tile&& tile) {
  for (int i0 = 0; i0 < s.sq; i0 += rows) {
    const int n = std::min(rows, s.sq - i0);
    const int jlo = key_range(p, s, i0).lo, jhi = key_range(p, s, i0 + n - 1).hi;
    for (int j0 = jlo - jlo % BK; j0 < jhi; j0 += BK) tile(i0, n, j0, std::min(BK, s.sk - j0));
  }
}

// n rows of an fp32 accumulator (d wide) times mul, into head h's rows from t0 of dst.
template <typename T>
void store_rows(const AttnParams& p, T* dst, const AttnStrides& st, int b, int h, int64_t t0,
                int n, const std::vector<float>& acc, float mul) {
  const int d = p.head_dim;
  for (int i = 0; i < n; ++i) {
    T* r = row(dst, st, b, h, t0 + i);
    const float* a = &acc[static_cast<size_t>(i) * d];
    for (int c = 0; c < d; c += simd::W)
      simd::store_n(r + c, simd::load_n(a + c, d - c) * mul, d - c);
  }
}

// unit(b, hk, scratch) for every (sequence, kv head), over threads each with its own Scratch.
template <typename Scratch, typename Unit>
void for_units(const AttnParams& p, Unit&& unit) {
  const int64_t units = static_cast<int64_t>(p.batch) * p.heads_kv;
#pragma omp parallel
  {
    Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u)
      unit(static_cast<int>(u / p.heads_kv), static_cast<int>(u % p.heads_kv), w);
  }
}

struct BwdScratch {
  std::vector<float> q, dout, delta, kt, vt, k, dq, dk, dv, s, dp, th;
};

// Query rows [i0, i0 + n) of one head against key tile [j0, j0 + nk): recomputes P from lse,
// then accumulates dV += P^T dO and dK += dS^T Q (unit-wide buffers) and dQ += dS K.
void bwd_tile(const AttnParams& p, const Seq& s, int i0, int n, int j0, int nk, const bool* kpm,
              const float* lse, BwdScratch& w) {
  const int d = p.head_dim;
  const size_t tile = static_cast<size_t>(j0 / BK) * d * BK;
  const float* qb = &w.q[static_cast<size_t>(i0) * d];
  const float* dob = &w.dout[static_cast<size_t>(i0) * d];
  float* sm = w.s.data();
  float* dp = w.dp.data();
  // keys [j0, j0 + vis) are the only ones a row of this block can see in this tile
  const int vis = std::min(nk, key_range(p, s, i0 + n - 1).hi - j0);
  const int cols = visible_cols(vis);
  gemm(n, cols, d, qb, d, 1, &w.kt[tile], BK, sm, BK, false);   // S = (scale Q) K^T
  gemm(n, cols, d, dob, d, 1, &w.vt[tile], BK, dp, BK, false);  // dP = dO V^T
  for (int i = 0; i < n; ++i) {
    float* sr = sm + i * BK;  // becomes P
    float* dr = dp + i * BK;  // becomes dS
    float* th = p.softcap > 0.0f ? &w.th[i * BK] : nullptr;
    mask_row(p, sr, j0, nk, key_range(p, s, i0 + i), kpm, th);
    const float delta = w.delta[i0 + i];
    exp_neg_sub(sr, cols, lse[i0 + i]);  // P; masked: exp(-inf) = 0; empty row: lse = +inf -> 0
    for (int j = 0; j < cols; ++j) dr[j] = sr[j] * (dr[j] - delta);  // dS
    if (th != nullptr)
      for (int j = 0; j < vis; ++j) dr[j] *= 1.0f - th[j] * th[j];  // softcap * tanh(s / softcap)
  }
  const size_t kr = static_cast<size_t>(j0) * d;
  gemm(vis, d, n, sm, 1, BK, dob, d, &w.dv[kr], d, true);  // dV += P^T dO
  gemm(vis, d, n, dp, 1, BK, qb, d, &w.dk[kr], d, true);   // dK += dS^T (scale Q)
  gemm(n, d, vis, dp, BK, 1, &w.k[kr], d, &w.dq[static_cast<size_t>(i0) * d], d, true);  // dQ
}

template <typename T>
void bwd_unit(const AttnParams& p, const T* dout, const T* q, const T* k, const T* v, const T* out,
              const float* lse, T* dq, T* dk, T* dv, int b, int hk, BwdScratch& w) {
  const int d = p.head_dim;
  const Seq s = sequence(p, b);
  const int group = p.heads_q / p.heads_kv;
  const bool* kpm = p.key_padding_mask ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen_k
                                       : nullptr;
  load_head_t(p, k, p.k, b, hk, s.k0, s.sk, w.kt);
  load_head_t(p, v, p.v, b, hk, s.k0, s.sk, w.vt);
  load_head(p, k, p.k, b, hk, s.k0, s.sk, w.k);
  w.dk.assign(static_cast<size_t>(s.sk) * d, 0.0f);
  w.dv.assign(static_cast<size_t>(s.sk) * d, 0.0f);
  w.s.resize(BQ * BK), w.dp.resize(BQ * BK), w.th.resize(BQ * BK);
  std::vector<float> lrow;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    load_head(p, q, p.q, b, h, s.q0, s.sq, w.q, p.scale);
    load_head(p, dout, p.o, b, h, s.q0, s.sq, w.dout);
    row_terms(p, dout, out, lse, b, h, s, w.delta, lrow);
    w.dq.assign(static_cast<size_t>(s.sq) * d, 0.0f);
    for_tiles(p, s, BQ, [&](int i0, int n, int j0, int nk) {
      bwd_tile(p, s, i0, n, j0, nk, kpm, lrow.data(), w);
    });
    store_rows(p, dq, p.o, b, h, s.q0, s.sq, w.dq, p.scale);
  }
  store_rows(p, dk, p.dk, b, hk, s.k0, s.sk, w.dk, 1.0f);  // Q was pre-scaled
  store_rows(p, dv, p.dv, b, hk, s.k0, s.sk, w.dv, 1.0f);
}

#if defined(FASTLM_DPBF16)
// bf16 inputs on vdpbf16ps (bf16_gemm.h): the five GEMMs read bf16 words; P and dS are rounded
// to bf16 as their products' inputs (as FlashAttention does on GPUs), everything else is fp32.
// Q is not pre-scaled here: the scale multiplies the fp32 scores, dQ and dK.
// Query rows per backward tile: twice the fp32 path's, so each key tile's dK/dV accumulators
// are read and written half as often per sequence (at 4x the GEMM rate that traffic showed).
constexpr int kBwdRows = 64;

struct BwdScratchBf16 {
#if defined(FASTLM_AMX)
  bf16dot::amx::Session tiles;  // configured once per thread (see FwdScratchBf16)
#endif
  std::vector<uint32_t> kt, vt, kv, q, qv, dout, doutv;  // see bwd_unit_bf16
  std::vector<uint32_t> pw, dsw, pt, dst;                // one tile's P / dS as words
  std::vector<float> delta, dq, dk, dv, s, dp, th;
};

// dS = P (dP - delta) for n columns, straight to bf16 words (the odd last paired with 0).
inline void ds_words(const float* pr, const float* dpr, float delta, int n, uint32_t* dst) {
  const __m512 vd = _mm512_set1_ps(delta);
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(pr + j),
                                   _mm512_sub_ps(_mm512_loadu_ps(dpr + j), vd));
    const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(pr + j + 16),
                                   _mm512_sub_ps(_mm512_loadu_ps(dpr + j + 16), vd));
    const __m512bh v = _mm512_cvtne2ps_pbh(b, a);
    _mm512_storeu_si512(dst + j / 2, reinterpret_cast<const __m512i&>(v));
  }
  if (j < n) {
    float tail[32];
    for (int t = j; t < n; ++t) tail[t - j] = pr[t] * (dpr[t] - delta);
    bf16dot::pack_f32(tail, n - j, dst + j / 2);
  }
}

void bwd_tile_bf16(const AttnParams& p, const Seq& s, int i0, int n, int j0, int nk,
                   const bool* kpm, const float* lse, BwdScratchBf16& w) {
  const int d = p.head_dim, d2 = (d + 1) / 2, n2 = (n + 1) / 2;
#if defined(FASTLM_AMX)
  const bf16dot::amx::Session tiles;  // configured once for this tile's GEMMs
#endif
  const size_t tile = static_cast<size_t>(j0 / BK) * d2 * BK;
  float* sm = w.s.data();
  float* dp = w.dp.data();
  const int vis = std::min(nk, key_range(p, s, i0 + n - 1).hi - j0);
  const int cols = visible_cols(vis), vis2 = (vis + 1) / 2;
  const uint32_t* qa = &w.q[static_cast<size_t>(i0) * d2];
  const uint32_t* da = &w.dout[static_cast<size_t>(i0) * d2];
  bf16dot::gemm(n, cols, d2, qa, d2, 1, &w.kt[tile], BK, sm, BK, false);  // S = Q K^T
  bf16dot::gemm(n, cols, d2, da, d2, 1, &w.vt[tile], BK, dp, BK, false);  // dP = dO V^T
  // without soft-capping the scale goes into the exponent (masking sets -inf either way)
  const bool fold = p.softcap <= 0.0f && p.scale > 0.0f;
  for (int i = 0; i < n; ++i) {
    float* sr = sm + i * BK;  // becomes P
    float* dr = dp + i * BK;  // becomes dS
    if (!fold)
      for (int j = 0; j < cols; ++j) sr[j] *= p.scale;
    float* th = p.softcap > 0.0f ? &w.th[i * BK] : nullptr;
    mask_row(p, sr, j0, nk, key_range(p, s, i0 + i), kpm, th);
    const float delta = w.delta[i0 + i];
    exp_p_bf16<false>(sr, cols, lse[i0 + i], fold ? p.scale : 1.0f, sr, nullptr);  // as the forward's P
    bf16dot::pack_f32(sr, 2 * vis2, &w.pw[i * (BK / 2)]);
    if (th != nullptr) {
      for (int j = 0; j < cols; ++j) dr[j] = sr[j] * (dr[j] - delta);
      for (int j = 0; j < vis; ++j) dr[j] *= 1.0f - th[j] * th[j];
      bf16dot::pack_f32(dr, 2 * vis2, &w.dsw[i * (BK / 2)]);
    } else {
      ds_words(sr, dr, delta, 2 * vis2, &w.dsw[i * (BK / 2)]);
    }
  }
  // P^T and dS^T as the A operands of dV and dK: pairs of query rows interleaved, word (i2, j)
  // at [i2 * BK + j], read with lda = 1, a_k = BK; on the tiles key-major instead, word (j, i2)
  // at [j * kBwdRows / 2 + i2] (a tile load reads each key's query pairs contiguously)
  int lda = 1, a_k = BK;
#if defined(FASTLM_AMX)
  if (vis >= 16 && n % 32 == 0 && d % 16 == 0 && bf16dot::amx::ready()) {
    lda = kBwdRows / 2, a_k = 1;
    // keys up to vis rounded to 16 (rows past vis are never read; a byte-wise loop here was
    // a tenth of the backward)
    const int c16 = (vis + 15) / 16;
    bf16dot::pair_words_t(reinterpret_cast<const uint16_t*>(w.pw.data()), BK, n / 32, c16,
                          w.pt.data(), lda);
    bf16dot::pair_words_t(reinterpret_cast<const uint16_t*>(w.dsw.data()), BK, n / 32, c16,
                          w.dst.data(), lda);
  }
#endif
  if (a_k != 1) {
    for (int i2 = 0; i2 < n2; ++i2) {
      const bool two = 2 * i2 + 1 < n;
      const auto* p0 = reinterpret_cast<const uint16_t*>(&w.pw[(2 * i2) * (BK / 2)]);
      const auto* d0 = reinterpret_cast<const uint16_t*>(&w.dsw[(2 * i2) * (BK / 2)]);
      bf16dot::interleave(p0, two ? p0 + BK : nullptr, vis, &w.pt[i2 * BK]);
      bf16dot::interleave(d0, two ? d0 + BK : nullptr, vis, &w.dst[i2 * BK]);
    }
  }
  const size_t kr = static_cast<size_t>(j0) * d;
  const size_t qr = static_cast<size_t>(i0 / 2) * d;
  bf16dot::gemm(vis, d, n2, w.pt.data(), lda, a_k, &w.doutv[qr], d, &w.dv[kr], d, true);  // dV
  bf16dot::gemm(vis, d, n2, w.dst.data(), lda, a_k, &w.qv[qr], d, &w.dk[kr], d, true);  // dK/scale
  bf16dot::gemm(n, d, vis2, w.dsw.data(), BK / 2, 1, &w.kv[static_cast<size_t>(j0 / 2) * d], d,
                &w.dq[static_cast<size_t>(i0) * d], d, true);  // dQ / scale
}

void bwd_unit_bf16(const AttnParams& p, const bf16* dout, const bf16* q, const bf16* k,
                   const bf16* v, const bf16* out, const float* lse, bf16* dq, bf16* dk,
                   bf16* dv, int b, int hk, BwdScratchBf16& w) {
  const int d = p.head_dim, d2 = (d + 1) / 2;
  const Seq s = sequence(p, b);
  const int group = p.heads_q / p.heads_kv;
  const bool* kpm = p.key_padding_mask ? p.key_padding_mask + static_cast<int64_t>(b) * p.seqlen_k
                                       : nullptr;
  w.kt.resize(words_t_size(s.sk, d));    // K^T tiles: Q K^T
  w.vt.resize(words_t_size(s.sk, d));    // V^T tiles: dO V^T
  w.kv.resize(words_vnni_size(s.sk, d));  // K row pairs: dS K
  load_words_t(p, k, p.k, b, hk, s.k0, s.sk, w.kt.data());
  load_words_t(p, v, p.v, b, hk, s.k0, s.sk, w.vt.data());
  load_words_vnni(p, k, p.k, b, hk, s.k0, s.sk, w.kv.data());
  w.dk.assign(static_cast<size_t>(s.sk) * d, 0.0f);
  w.dv.assign(static_cast<size_t>(s.sk) * d, 0.0f);
  w.s.resize(kBwdRows * BK), w.dp.resize(kBwdRows * BK), w.th.resize(kBwdRows * BK);
  w.pw.resize(kBwdRows * BK / 2), w.dsw.resize(kBwdRows * BK / 2);
  w.pt.resize(kBwdRows / 2 * BK), w.dst.resize(kBwdRows / 2 * BK);
  std::vector<float> lrow;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    w.q.resize(static_cast<size_t>(s.sq) * d2), w.dout.resize(static_cast<size_t>(s.sq) * d2);
    w.qv.resize(words_vnni_size(s.sq, d)), w.doutv.resize(words_vnni_size(s.sq, d));
    load_words_rows(p, q, p.q, b, h, s.q0, s.sq, w.q.data());            // Q K^T
    load_words_rows(p, dout, p.o, b, h, s.q0, s.sq, w.dout.data());      // dO V^T
    load_words_vnni(p, q, p.q, b, h, s.q0, s.sq, w.qv.data());           // dS^T Q
    load_words_vnni(p, dout, p.o, b, h, s.q0, s.sq, w.doutv.data());     // P^T dO
    row_terms(p, dout, out, lse, b, h, s, w.delta, lrow);
    w.dq.assign(static_cast<size_t>(s.sq) * d, 0.0f);
    for_tiles(p, s, kBwdRows, [&](int i0, int n, int j0, int nk) {
      bwd_tile_bf16(p, s, i0, n, j0, nk, kpm, lrow.data(), w);
    });
    store_rows(p, dq, p.o, b, h, s.q0, s.sq, w.dq, p.scale);
  }
  store_rows(p, dk, p.dk, b, hk, s.k0, s.sk, w.dk, p.scale);  // Q was not pre-scaled here
  store_rows(p, dv, p.dv, b, hk, s.k0, s.sk, w.dv, 1.0f);
}
#endif

template <typename T>
void bwd(const AttnParams& p, const T* dout, const T* q, const T* k, const T* v, const T* out,
         const float* lse, T* dq, T* dk, T* dv) {
#if defined(FASTLM_DPBF16)
  if constexpr (std::is_same_v<T, bf16>) {
    return for_units<BwdScratchBf16>(p, [&](int b, int hk, BwdScratchBf16& w) {
      bwd_unit_bf16(p, dout, q, k, v, out, lse, dq, dk, dv, b, hk, w);
    });
  }
#endif
  for_units<BwdScratch>(p, [&](int b, int hk, BwdScratch& w) {
    bwd_unit(p, dout, q, k, v, out, lse, dq, dk, dv, b, hk, w);
  });
}

}  // namespace

void attention_bwd_cpu(const AttnParams& p, DType dtype, const void* dout, const void* q,
                       const void* k, const void* v, const void* out, const float* lse, void* dq,
                       void* dk, void* dv) {
  switch (dtype) {
    case DType::f32:
      return bwd(p, static_cast<const float*>(dout), static_cast<const float*>(q),
                 static_cast<const float*>(k), static_cast<const float*>(v),
                 static_cast<const float*>(out), lse, static_cast<float*>(dq),
                 static_cast<float*>(dk), static_cast<float*>(dv));
    case DType::bf16:
      return bwd(p, static_cast<const bf16*>(dout), static_cast<const bf16*>(q),
                 static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                 static_cast<const bf16*>(out), lse, static_cast<bf16*>(dq), static_cast<bf16*>(dk),
                 static_cast<bf16*>(dv));
    case DType::f16:
      return bwd(p, static_cast<const fp16*>(dout), static_cast<const fp16*>(q),
                 static_cast<const fp16*>(k), static_cast<const fp16*>(v),
                 static_cast<const fp16*>(out), lse, static_cast<fp16*>(dq), static_cast<fp16*>(dk),
                 static_cast<fp16*>(dv));
  }
}

}  // namespace fastlm
