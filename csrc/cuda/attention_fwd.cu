// Flash attention forward on tensor cores (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate).
//
// Grid (query blocks, query heads, sequences); a block of 4 warps owns 64 query rows, 16 per
// warp, and streams 64-key tiles of K and V through shared memory. Per tile and warp:
// S = Q K^T on tensor cores -> shared memory -> online softmax by the warp's lanes (two lanes
// per row, 32 columns each) -> P (16-bit) -> O = O * alpha + P V, with O kept in shared memory
// in fp32 (rescaling needs to know an element's row, which WMMA fragments do not tell).
#include <cfloat>

#include "cuda/attention.h"
#include "cuda/attention_common.cuh"

namespace fastlm {
namespace cuda {
namespace attn {

template <int D>
struct FwdSmem {
  static constexpr size_t tile = kBN * Dims<D>::kLdH * 2;  // one 16-bit 64-row tile, bytes
  static constexpr size_t q = 0, k = tile, v = 2 * tile;
  static constexpr size_t s = 3 * tile;                             // float [4][16][kLdS]
  static constexpr size_t pr = s + kWarps * 16 * kLdS * 4;          // 16-bit [4][16][kLdP]
  static constexpr size_t o = pr + kWarps * 16 * kLdP * 2;          // float [4][16][kLdF]
  static constexpr size_t bytes = o + kWarps * 16 * Dims<D>::kLdF * 4;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
attention_fwd_kernel(const AttnParams p, const T* __restrict__ q, const T* __restrict__ k,
                     const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                     bool vec) {
  using S = FwdSmem<D>;
  constexpr int ldh = Dims<D>::kLdH, ldf = Dims<D>::kLdF;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + S::q);
  T* ks = reinterpret_cast<T*>(smem + S::k);
  T* vs = reinterpret_cast<T*>(smem + S::v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* ss = reinterpret_cast<float*>(smem + S::s) + warp * 16 * kLdS;
  T* ps = reinterpret_cast<T*>(smem + S::pr) + warp * 16 * kLdP;
  float* os = reinterpret_cast<float*>(smem + S::o) + warp * 16 * ldf;

  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBM;
  const Seq seq = sequence(p, b);
  if (i0 >= seq.sq) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int i1 = min(i0 + kBM, seq.sq);

  load_tile<T, D>(qs, q, p.q, b, h, seq.q0, i0, seq.sq, vec);
  for (int idx = lane; idx < 16 * ldf; idx += 32) os[idx] = 0.0f;
  // Lanes read rows other lanes zeroed; with no key tile (rows that see no key) nothing else
  // orders these writes before the epilogue's reads.
  __syncwarp();

  // Lane pair (2r, 2r+1) owns row r of the warp's 16: columns [32 * half, 32 * half + 32).
  const int rr = lane / 2, half = lane % 2;
  const int i = i0 + warp * 16 + rr;
  float m = -INFINITY, l = 0.0f;

  const Range tiles = key_tiles(p, seq, i0, i1);
  for (int j0 = tiles.lo; j0 < tiles.hi; j0 += kBN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<T, D>(ks, k, p.k, b, hk, seq.k0, j0, seq.sk, vec);
    load_tile<T, D>(vs, v, p.v, b, hk, seq.k0, j0, seq.sk, vec);
    __syncthreads();

    // S (16 x 64) = Q_w K^T
    for (int n = 0; n < kBN / 16; ++n) {
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a;
        FragBCol<T> bk;
        wmma::load_matrix_sync(a, qs + (warp * 16) * ldh + kk * 16, ldh);
        wmma::load_matrix_sync(bk, ks + (n * 16) * ldh + kk * 16, ldh);
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(ss + n * 16, acc, kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this row's 32 columns, combined across the lane pair.
    float* srow = ss + rr * kLdS + half * 32;
    float tile_max = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int j = j0 + half * 32 + c;
      float dcap;
      float sc = finish_score(p, srow[c], &dcap);
      if (!visible(p, seq, b, i, j)) sc = -INFINITY;
      srow[c] = sc;
      tile_max = fmaxf(tile_max, sc);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: no NaN
    float sum = 0.0f;
    T* prow = ps + rr * kLdP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const float e = __expf(srow[c] - m_use);
      sum += e;
      prow[c] = from_f<T>(e);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = __expf(m - m_use);  // m = -inf -> 0
    l = l * alpha + sum;
    m = m_new;
    float* orow = os + rr * ldf + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();

    // O_w += P V
    for (int dn = 0; dn < D / 16; ++dn) {
      FragC acc;
      wmma::load_matrix_sync(acc, os + dn * 16, ldf, wmma::mem_row_major);
      for (int kk = 0; kk < kBN / 16; ++kk) {
        FragA<T> a;
        FragBRow<T> bv;
        wmma::load_matrix_sync(a, ps + kk * 16, kLdP);
        wmma::load_matrix_sync(bv, vs + (kk * 16) * ldh + dn * 16, ldh);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + dn * 16, acc, ldf, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (i >= seq.sq) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key: out = 0
  T* orow_g = out + b * p.o.b + h * p.o.h + (seq.q0 + i) * p.o.t + half * (D / 2);
  const float* orow = os + rr * ldf + half * (D / 2);
  for (int c = 0; c < D / 2; ++c) orow_g[c] = from_f<T>(orow[c] * inv);
  if (half == 0)
    lse[b * p.lse.b + h * p.lse.h + (seq.q0 + i) * p.lse.t] = l > 0.0f ? m + logf(l) : INFINITY;
}

template <typename T, int D>
cudaError_t launch_fwd(const AttnParams& p, int max_sq, const void* q, const void* k,
                       const void* v, void* out, float* lse, bool vec, cudaStream_t stream) {
  const size_t bytes = FwdSmem<D>::bytes;
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid((max_sq + kBM - 1) / kBM, p.heads_q, p.batch);
  kernel<<<grid, kThreads, bytes, stream>>>(p, static_cast<const T*>(q),
                                            static_cast<const T*>(k), static_cast<const T*>(v),
                                            static_cast<T*>(out), lse, vec);
  return cudaGetLastError();
}

}  // namespace attn

namespace {
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool strides8(const AttnStrides& s) { return s.b % 8 == 0 && s.h % 8 == 0 && s.t % 8 == 0; }
}  // namespace

cudaError_t attention_fwd_cuda(const AttnParams& p, DType dtype, int max_seqlen_q,
                               const void* q, const void* k, const void* v, void* out,
                               float* lse, cudaStream_t stream) {
  if (max_seqlen_q <= 0 || p.batch == 0) return cudaSuccess;
  const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && strides8(p.q) &&
                   strides8(p.k) && strides8(p.v);
  const bool bf16 = dtype == DType::bf16;
  if (dtype != DType::bf16 && dtype != DType::f16) return cudaErrorInvalidValue;
  if (p.head_dim == 64)
    return bf16 ? attn::launch_fwd<__nv_bfloat16, 64>(p, max_seqlen_q, q, k, v, out, lse, vec,
                                                      stream)
                : attn::launch_fwd<__half, 64>(p, max_seqlen_q, q, k, v, out, lse, vec, stream);
  if (p.head_dim == 128)
    return bf16 ? attn::launch_fwd<__nv_bfloat16, 128>(p, max_seqlen_q, q, k, v, out, lse, vec,
                                                       stream)
                : attn::launch_fwd<__half, 128>(p, max_seqlen_q, q, k, v, out, lse, vec, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
