// Attention parameters shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: plain data,
// no torch, includable by g++ and nvcc alike.
//
// One struct serves the dense (B, H, S, D) layout and the packed varlen (T, H, D) layout:
// every tensor is addressed as base + seq*stride_b + head*stride_h + token*stride_t, and a
// sequence's first token is cu_seqlens[seq] (varlen) or 0 (dense). The head dim is contiguous.
#pragma once

#include <cstdint>

namespace fastlm {

struct AttnStrides {
  int64_t b, h, t;  // elements between consecutive sequences, heads, tokens
};

struct AttnParams {
  int batch;             // number of sequences
  int heads_q, heads_kv;
  int head_dim;
  int seqlen_q, seqlen_k;            // dense: per-sequence lengths (varlen: unused)
  const int32_t* cu_seqlens_q;       // varlen offsets (batch + 1), or nullptr for dense
  const int32_t* cu_seqlens_k;
  const bool* key_padding_mask;      // dense only: (batch, seqlen_k), true = attend; or nullptr
  float scale;
  float softcap;                     // > 0: s = softcap * tanh(s / softcap)
  int window_left, window_right;     // -1 = unbounded; causal => window_right = 0
  AttnStrides q, k, v, o;            // o also describes dout and dq
  AttnStrides dk, dv;                // the backward's dk/dv (the CPU kernels; = k, v otherwise)
  AttnStrides lse;                   // fp32 log-sum-exp, one per (seq, head, query)
};

enum class DType { f32, bf16, f16 };

}  // namespace fastlm
