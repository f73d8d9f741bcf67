// Flash attention backward on tensor cores, deterministic (no atomics), in three kernels:
//
// 1. delta = rowsum(dO * O) in fp32, one warp per query row.
// 2. dK/dV: grid (key blocks, kv heads, sequences); a block of 4 warps owns 64 keys (16 per
//    warp) and loops over the query heads of its GQA group and the query tiles that can see
//    its keys, recomputing P^T = exp(S^T - lse) and accumulating dV += P^T dO and
//    dK += dS^T Q in registers. One block per output element: summation order is fixed.
// 3. dQ: grid (query blocks, query heads, sequences), like the forward: recomputes S, P and
//    dP = dO V^T per key tile and accumulates dQ += dS K in registers.
// The recompute in (3) costs two extra tile products per tile against an atomic dQ; the
// result is bit-reproducible, which the trainer's exact-resume guarantee relies on.
#include <cfloat>

#include "cuda/attention.h"
#include "cuda/attention_common.cuh"

namespace fastlm {
namespace cuda {
namespace attn {

template <typename T, int D>
__global__ void attention_delta_kernel(const AttnParams p, const T* __restrict__ dout,
                                       const T* __restrict__ out, float* __restrict__ delta) {
  constexpr int kRowsPerBlock = 8;  // one warp per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * kRowsPerBlock + warp;
  const Seq seq = sequence(p, b);
  if (i >= seq.sq) return;
  const int64_t off = b * p.o.b + h * p.o.h + (seq.q0 + i) * p.o.t;
  float acc = 0.0f;
  for (int c = lane; c < D; c += 32) acc += to_f(dout[off + c]) * to_f(out[off + c]);
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) delta[b * p.lse.b + h * p.lse.h + (seq.q0 + i) * p.lse.t] = acc;
}

// Loads lse and delta of query rows [i0, i0 + 64) (zeros past the sequence).
__device__ __forceinline__ void load_row_stats(const AttnParams& p, const Seq& seq, int b,
                                               int h, int i0, const float* lse,
                                               const float* delta, float* lse_s,
                                               float* delta_s) {
  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    const int i = i0 + r;
    const int64_t off = b * p.lse.b + h * p.lse.h + (seq.q0 + i) * p.lse.t;
    lse_s[r] = i < seq.sq ? lse[off] : INFINITY;
    delta_s[r] = i < seq.sq ? delta[off] : 0.0f;
  }
}

template <int D>
struct DkdvSmem {
  static constexpr size_t tile = kBN * Dims<D>::kLdH * 2;
  static constexpr size_t k = 0, v = tile, q = 2 * tile, dout = 3 * tile;
  static constexpr size_t warp_f = 16 * kLdS * 4;  // one warp's float 16 x 64 tile
  // per warp, contiguous: float S^T then float dP^T (so the final staging may span both)
  static constexpr size_t st = 4 * tile;
  static constexpr size_t pt = st + kWarps * 2 * warp_f;  // 16-bit P^T, per warp
  static constexpr size_t dst = pt + kWarps * 16 * kLdP * 2;
  static constexpr size_t stats = dst + kWarps * 16 * kLdP * 2;  // lse[64], delta[64]
  static constexpr size_t bytes = stats + 2 * kBM * 4;
  // the final fp32 staging of dK/dV (16 x kLdF per warp) reuses S^T and dP^T
  static_assert(16 * Dims<D>::kLdF * 4 <= 2 * warp_f, "staging does not fit");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
attention_dkdv_kernel(const AttnParams p, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const T* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      T* __restrict__ dk, T* __restrict__ dv, AttnStrides dks, AttnStrides dvs,
                      bool vec) {
  using S = DkdvSmem<D>;
  constexpr int ldh = Dims<D>::kLdH, ldf = Dims<D>::kLdF, nf = Dims<D>::kFrags;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem + S::k);
  T* vs = reinterpret_cast<T*>(smem + S::v);
  T* qs = reinterpret_cast<T*>(smem + S::q);
  T* dos = reinterpret_cast<T*>(smem + S::dout);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* st = reinterpret_cast<float*>(smem + S::st + warp * 2 * S::warp_f);
  float* dpt = st + 16 * kLdS;
  T* pt = reinterpret_cast<T*>(smem + S::pt) + warp * 16 * kLdP;
  T* dst = reinterpret_cast<T*>(smem + S::dst) + warp * 16 * kLdP;
  float* lse_s = reinterpret_cast<float*>(smem + S::stats);
  float* delta_s = lse_s + kBM;

  const int b = blockIdx.z, hk = blockIdx.y, j0 = blockIdx.x * kBN;
  const Seq seq = sequence(p, b);
  if (j0 >= seq.sk) return;
  const int group = p.heads_q / p.heads_kv;
  load_tile<T, D>(ks, k, p.k, b, hk, seq.k0, j0, seq.sk, vec);
  load_tile<T, D>(vs, v, p.v, b, hk, seq.k0, j0, seq.sk, vec);

  FragC dk_acc[nf], dv_acc[nf];
  for (int f = 0; f < nf; ++f) {
    wmma::fill_fragment(dk_acc[f], 0.0f);
    wmma::fill_fragment(dv_acc[f], 0.0f);
  }
  // Lane pair owns key row rr of the warp's 16, query columns [32 * half, +32).
  const int rr = lane / 2, half = lane % 2;
  const int j = j0 + warp * 16 + rr;
  const Range rows = query_rows(p, seq, j0, min(j0 + kBN, seq.sk));

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    for (int i0 = (rows.lo / kBM) * kBM; i0 < rows.hi; i0 += kBM) {
      __syncthreads();
      load_tile<T, D>(qs, q, p.q, b, h, seq.q0, i0, seq.sq, vec);
      load_tile<T, D>(dos, dout, p.o, b, h, seq.q0, i0, seq.sq, vec);
      load_row_stats(p, seq, b, h, i0, lse, delta, lse_s, delta_s);
      __syncthreads();

      // S^T (16 keys x 64 queries) = K_w Q^T ; dP^T = V_w dO^T
      for (int n = 0; n < kBM / 16; ++n) {
        FragC s_acc, dp_acc;
        wmma::fill_fragment(s_acc, 0.0f);
        wmma::fill_fragment(dp_acc, 0.0f);
        for (int kk = 0; kk < D / 16; ++kk) {
          FragA<T> a;
          FragBCol<T> bq;
          wmma::load_matrix_sync(a, ks + (warp * 16) * ldh + kk * 16, ldh);
          wmma::load_matrix_sync(bq, qs + (n * 16) * ldh + kk * 16, ldh);
          wmma::mma_sync(s_acc, a, bq, s_acc);
          wmma::load_matrix_sync(a, vs + (warp * 16) * ldh + kk * 16, ldh);
          wmma::load_matrix_sync(bq, dos + (n * 16) * ldh + kk * 16, ldh);
          wmma::mma_sync(dp_acc, a, bq, dp_acc);
        }
        wmma::store_matrix_sync(st + n * 16, s_acc, kLdS, wmma::mem_row_major);
        wmma::store_matrix_sync(dpt + n * 16, dp_acc, kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // P^T = exp(S^T - lse); dS^T = P^T (dP^T - delta) * d(softcap)
      for (int c = 0; c < 32; ++c) {
        const int col = half * 32 + c, i = i0 + col;
        float dcap;
        const float sc = finish_score(p, st[rr * kLdS + col], &dcap);
        const float pr = visible(p, seq, b, i, j) ? __expf(sc - lse_s[col]) : 0.0f;
        pt[rr * kLdP + col] = from_f<T>(pr);
        dst[rr * kLdP + col] = from_f<T>(pr * (dpt[rr * kLdS + col] - delta_s[col]) * dcap);
      }
      __syncwarp();

      // dV_w += P^T dO ; dK_w += dS^T Q   (scale applied once at the end)
      for (int dn = 0; dn < nf; ++dn) {
        for (int kk = 0; kk < kBM / 16; ++kk) {
          FragA<T> a;
          FragBRow<T> bm;
          wmma::load_matrix_sync(a, pt + kk * 16, kLdP);
          wmma::load_matrix_sync(bm, dos + (kk * 16) * ldh + dn * 16, ldh);
          wmma::mma_sync(dv_acc[dn], a, bm, dv_acc[dn]);
          wmma::load_matrix_sync(a, dst + kk * 16, kLdP);
          wmma::load_matrix_sync(bm, qs + (kk * 16) * ldh + dn * 16, ldh);
          wmma::mma_sync(dk_acc[dn], a, bm, dk_acc[dn]);
        }
      }
    }
  }

  // Stage each accumulator through this warp's fp32 scratch (S^T and dP^T, now free) and
  // write the rows inside the sequence.
  __syncwarp();
  float* stage = st;  // 16 x ldf floats fit in S^T + dP^T of this warp (static_assert above)
  for (int which = 0; which < 2; ++which) {
    FragC* acc = which == 0 ? dk_acc : dv_acc;
    for (int dn = 0; dn < nf; ++dn)
      wmma::store_matrix_sync(stage + dn * 16, acc[dn], ldf, wmma::mem_row_major);
    __syncwarp();
    if (j < seq.sk) {
      const AttnStrides& os = which == 0 ? dks : dvs;
      T* dst_row = (which == 0 ? dk : dv) + b * os.b + hk * os.h + (seq.k0 + j) * os.t;
      const float mul = which == 0 ? p.scale : 1.0f;
      for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c)
        dst_row[c] = from_f<T>(stage[rr * ldf + c] * mul);
    }
    __syncwarp();
  }
}

template <int D>
struct DqSmem {
  static constexpr size_t tile = kBN * Dims<D>::kLdH * 2;
  static constexpr size_t q = 0, dout = tile, k = 2 * tile, v = 3 * tile;
  static constexpr size_t warp_f = 16 * kLdS * 4;
  static constexpr size_t s = 4 * tile;  // per warp, contiguous: float S then float dP
  static constexpr size_t ds = s + kWarps * 2 * warp_f;  // 16-bit dS, per warp
  static constexpr size_t stats = ds + kWarps * 16 * kLdP * 2;
  static constexpr size_t bytes = stats + 2 * kBM * 4;
  static_assert(16 * Dims<D>::kLdF * 4 <= 2 * warp_f, "staging does not fit");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
attention_dq_kernel(const AttnParams p, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, const T* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dq, bool vec) {
  using S = DqSmem<D>;
  constexpr int ldh = Dims<D>::kLdH, ldf = Dims<D>::kLdF, nf = Dims<D>::kFrags;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + S::q);
  T* dos = reinterpret_cast<T*>(smem + S::dout);
  T* ks = reinterpret_cast<T*>(smem + S::k);
  T* vs = reinterpret_cast<T*>(smem + S::v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* ss = reinterpret_cast<float*>(smem + S::s + warp * 2 * S::warp_f);
  float* dps = ss + 16 * kLdS;
  T* dss = reinterpret_cast<T*>(smem + S::ds) + warp * 16 * kLdP;
  float* lse_s = reinterpret_cast<float*>(smem + S::stats);
  float* delta_s = lse_s + kBM;

  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBM;
  const Seq seq = sequence(p, b);
  if (i0 >= seq.sq) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int i1 = min(i0 + kBM, seq.sq);
  load_tile<T, D>(qs, q, p.q, b, h, seq.q0, i0, seq.sq, vec);
  load_tile<T, D>(dos, dout, p.o, b, h, seq.q0, i0, seq.sq, vec);
  load_row_stats(p, seq, b, h, i0, lse, delta, lse_s, delta_s);

  FragC dq_acc[nf];
  for (int f = 0; f < nf; ++f) wmma::fill_fragment(dq_acc[f], 0.0f);
  const int rr = lane / 2, half = lane % 2;
  const int row = warp * 16 + rr, i = i0 + row;

  const Range tiles = key_tiles(p, seq, i0, i1);
  for (int j0 = tiles.lo; j0 < tiles.hi; j0 += kBN) {
    __syncthreads();
    load_tile<T, D>(ks, k, p.k, b, hk, seq.k0, j0, seq.sk, vec);
    load_tile<T, D>(vs, v, p.v, b, hk, seq.k0, j0, seq.sk, vec);
    __syncthreads();

    // S = Q_w K^T ; dP = dO_w V^T   (16 x 64 each)
    for (int n = 0; n < kBN / 16; ++n) {
      FragC s_acc, dp_acc;
      wmma::fill_fragment(s_acc, 0.0f);
      wmma::fill_fragment(dp_acc, 0.0f);
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a;
        FragBCol<T> bm;
        wmma::load_matrix_sync(a, qs + (warp * 16) * ldh + kk * 16, ldh);
        wmma::load_matrix_sync(bm, ks + (n * 16) * ldh + kk * 16, ldh);
        wmma::mma_sync(s_acc, a, bm, s_acc);
        wmma::load_matrix_sync(a, dos + (warp * 16) * ldh + kk * 16, ldh);
        wmma::load_matrix_sync(bm, vs + (n * 16) * ldh + kk * 16, ldh);
        wmma::mma_sync(dp_acc, a, bm, dp_acc);
      }
      wmma::store_matrix_sync(ss + n * 16, s_acc, kLdS, wmma::mem_row_major);
      wmma::store_matrix_sync(dps + n * 16, dp_acc, kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c, j = j0 + col;
      float dcap;
      const float sc = finish_score(p, ss[rr * kLdS + col], &dcap);
      const float pr = visible(p, seq, b, i, j) ? __expf(sc - lse_s[row]) : 0.0f;
      dss[rr * kLdP + col] = from_f<T>(pr * (dps[rr * kLdS + col] - delta_s[row]) * dcap);
    }
    __syncwarp();

    // dQ_w += dS K
    for (int dn = 0; dn < nf; ++dn) {
      for (int kk = 0; kk < kBN / 16; ++kk) {
        FragA<T> a;
        FragBRow<T> bk;
        wmma::load_matrix_sync(a, dss + kk * 16, kLdP);
        wmma::load_matrix_sync(bk, ks + (kk * 16) * ldh + dn * 16, ldh);
        wmma::mma_sync(dq_acc[dn], a, bk, dq_acc[dn]);
      }
    }
  }

  __syncwarp();
  float* stage = ss;  // this warp's S and dP scratch, now free
  for (int dn = 0; dn < nf; ++dn)
    wmma::store_matrix_sync(stage + dn * 16, dq_acc[dn], ldf, wmma::mem_row_major);
  __syncwarp();
  if (i < seq.sq) {
    T* dst_row = dq + b * p.o.b + h * p.o.h + (seq.q0 + i) * p.o.t;
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c)
      dst_row[c] = from_f<T>(stage[rr * ldf + c] * p.scale);
  }
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T, int D>
cudaError_t launch_bwd(const AttnParams& p, int max_sq, int max_sk, const void* dout_,
                       const void* q_, const void* k_, const void* v_, const void* out_,
                       const float* lse, float* delta, void* dq_, void* dk_, void* dv_,
                       AttnStrides dks, AttnStrides dvs, bool vec, cudaStream_t stream) {
  const T* dout = static_cast<const T*>(dout_);
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const T* out = static_cast<const T*>(out_);
  attention_delta_kernel<T, D><<<dim3((max_sq + 7) / 8, p.heads_q, p.batch), 256, 0, stream>>>(
      p, dout, out, delta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  auto dkdv = attention_dkdv_kernel<T, D>;
  if ((err = allow_smem(dkdv, DkdvSmem<D>::bytes)) != cudaSuccess) return err;
  dkdv<<<dim3((max_sk + kBN - 1) / kBN, p.heads_kv, p.batch), kThreads, DkdvSmem<D>::bytes,
         stream>>>(p, q, k, v, dout, lse, delta, static_cast<T*>(dk_), static_cast<T*>(dv_),
                   dks, dvs, vec);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  auto dqk = attention_dq_kernel<T, D>;
  if ((err = allow_smem(dqk, DqSmem<D>::bytes)) != cudaSuccess) return err;
  dqk<<<dim3((max_sq + kBM - 1) / kBM, p.heads_q, p.batch), kThreads, DqSmem<D>::bytes,
        stream>>>(p, q, k, v, dout, lse, delta, static_cast<T*>(dq_), vec);
  return cudaGetLastError();
}

}  // namespace attn

namespace {
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool strides8(const AttnStrides& s) { return s.b % 8 == 0 && s.h % 8 == 0 && s.t % 8 == 0; }
}  // namespace

cudaError_t attention_bwd_cuda(const AttnParams& p, DType dtype, int max_seqlen_q,
                               int max_seqlen_k, const void* dout, const void* q, const void* k,
                               const void* v, const void* out, const float* lse,
                               float* delta_ws, void* dq, void* dk, void* dv,
                               AttnStrides dk_strides, AttnStrides dv_strides,
                               cudaStream_t stream) {
  if (p.batch == 0 || (max_seqlen_q <= 0 && max_seqlen_k <= 0)) return cudaSuccess;
  // Tile loads of q, k, v and dout go 16 bytes at a time when every row start is aligned.
  const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout) &&
                   strides8(p.q) && strides8(p.k) && strides8(p.v) && strides8(p.o);
  if (dtype != DType::bf16 && dtype != DType::f16) return cudaErrorInvalidValue;
  const bool bf16 = dtype == DType::bf16;
#define FASTLM_BWD(T, D)                                                                      \
  attn::launch_bwd<T, D>(p, max_seqlen_q, max_seqlen_k, dout, q, k, v, out, lse, delta_ws, dq, \
                         dk, dv, dk_strides, dv_strides, vec, stream)
  if (p.head_dim == 64) return bf16 ? FASTLM_BWD(__nv_bfloat16, 64) : FASTLM_BWD(__half, 64);
  if (p.head_dim == 128) return bf16 ? FASTLM_BWD(__nv_bfloat16, 128) : FASTLM_BWD(__half, 128);
#undef FASTLM_BWD
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
