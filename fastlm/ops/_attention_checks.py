"""Input validation for the attention ops: every message names the argument and the fix."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # dtypes the compiled backends run


def _fail(msg: str) -> None:
    raise ValueError(f"fastlm.ops.attention: {msg}")


def window_arg(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        _fail(f"window must be a pair (left, right) of ints, -1 for unbounded; got {window!r}")
    if left < -1 or right < -1:
        _fail(f"window sizes must be >= 0, or -1 for unbounded; got {window!r}")
    return left, right


def _check_common(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            _fail(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOATS and t.dtype != torch.float64:
            _fail(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype} (cast them first)")
    if not (q.device == k.device == v.device):
        _fail(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        _fail(f"head dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if q.shape[-1] == 0:
        _fail("head dim must be > 0")


def _check_heads(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        _fail(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value "
            f"heads ({hkv}) for grouped-query attention"
        )


def check_dense(q, k, v, key_padding_mask, segment_ids=None) -> None:
    _check_common(q, k, v, 4, "(batch, heads, seqlen, head_dim)")
    if q.shape[0] != k.shape[0]:
        _fail(f"batch size of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    _check_heads(q.shape[1], k.shape[1])
    if segment_ids is not None:
        _check_segments(q, k, key_padding_mask, segment_ids)
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
        _fail(f"key_padding_mask must be a bool tensor (True = attend), got {got}")
    expected = (k.shape[0], k.shape[2])
    if tuple(key_padding_mask.shape) != expected:
        _fail(
            f"key_padding_mask must have shape (batch, seqlen_k) = {expected}, got "
            f"{tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != q.device:
        _fail(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def check_sinks(sinks, q, heads_dim: int) -> None:
    if sinks is None:
        return
    heads = q.shape[heads_dim]
    if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
        got = getattr(sinks, "dtype", type(sinks).__name__)
        _fail(f"sinks must be a float tensor of one logit per query head, got {got}")
    if tuple(sinks.shape) != (heads,):
        _fail(f"sinks must have shape (num_query_heads,) = ({heads},), got "
              f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        _fail(f"sinks is on {sinks.device} but q is on {q.device}")


def _check_segments(q, k, key_padding_mask, segment_ids) -> None:
    if not isinstance(segment_ids, torch.Tensor):
        _fail(f"segment_ids must be a tensor of (batch, seqlen) ints, got "
              f"{type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex \
            or segment_ids.dtype == torch.bool:
        _fail(f"segment_ids must hold integers (one id per sequence), got {segment_ids.dtype}")
    if q.shape[2] != k.shape[2]:
        _fail(f"segment_ids need as many queries as keys (packed self-attention); got "
              f"{q.shape[2]} queries and {k.shape[2]} keys")
    expected = (q.shape[0], q.shape[2])
    if tuple(segment_ids.shape) != expected:
        _fail(f"segment_ids must have shape (batch, seqlen) = {expected}, got "
              f"{tuple(segment_ids.shape)}")
    if segment_ids.device != q.device:
        _fail(f"segment_ids is on {segment_ids.device} but q is on {q.device}")
    if key_padding_mask is not None:
        _fail("segment_ids and key_padding_mask cannot be combined; give padding its own "
              "segment id (it then attends only to itself) and ignore its outputs")


def check_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> None:
    _check_common(q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_heads(q.shape[1], k.shape[1])
    for name, cu, total, max_len in (
        ("cu_seqlens_q", cu_q, q.shape[0], max_q),
        ("cu_seqlens_k", cu_k, k.shape[0], max_k),
    ):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            _fail(f"{name} must be a 1-D int32 tensor of N+1 offsets")
        if cu.device != q.device:
            _fail(f"{name} is on {cu.device} but q is on {q.device}")
        if cu.numel() < 2:
            _fail(f"{name} needs at least 2 entries (N+1 offsets for N >= 1 sequences)")
        if cu.device.type == "cpu":  # on GPU these checks would force a device sync
            lengths = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
                _fail(
                    f"{name} must start at 0, be non-decreasing and end at the number of rows "
                    f"({total}); got {cu.tolist()}"
                )
            if int(lengths.max()) > max_len:
                _fail(f"a sequence is longer ({int(lengths.max())}) than the max_seqlen given ({max_len})")
    if cu_q.numel() != cu_k.numel():
        _fail(f"cu_seqlens_q and cu_seqlens_k describe different numbers of sequences "
              f"({cu_q.numel() - 1} vs {cu_k.numel() - 1})")
