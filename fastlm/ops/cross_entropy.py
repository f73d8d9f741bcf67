"""Fused linear + cross-entropy: the LM-head matmul and the loss without ever holding the full
(tokens x vocab) logits.

Rows are processed in chunks: logits of a chunk (chunk x V) are computed, the row kernel turns
them into the per-row loss and, in place, into d(loss)/d(logits) (fp32 math), and two matmuls
fold that into the gradients of the hidden states and of the weight. The gradients are thus
computed during the forward (as Liger-Kernel does) and the backward only scales them by the
incoming gradient. Peak extra memory: one chunk of logits instead of N x V (for 8k tokens and
a 128k vocabulary in fp32, 4 GB -> 64 MB at the default chunk).

Backends: ``triton`` (triton_kernels/cross_entropy.py row kernel: CUDA tensors, CPU ones in
Triton's interpreter), ``cpu`` (csrc/cpu/cross_entropy.cpp row kernel), ``torch`` (the same
chunking with torch ops). The chunk's matmuls are torch's (cuBLAS, or the CPU's) in every
backend.
"""

from __future__ import annotations

import math

import torch

from fastlm._build import load_extension
from fastlm._custom_op import custom_op
from fastlm._dispatch import (
    Call,
    all_of,
    define_op,
    extension_check,
    needs_device,
    needs_dtypes,
    triton_check,
    triton_launchers,
)
from fastlm.ops import _fused_common as fc
from fastlm.ops._autocast import autocast_inputs

__all__ = ["fused_linear_cross_entropy"]

_op = define_op("linear_cross_entropy",
                order={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")})


def _ce_rows_torch(logits, labels, row_scale, ignore_index, smoothing, softcap, grad):
    """Reference row kernel: (loss per row, fp32) and, if grad, logits overwritten with
    row_scale * dloss/dlogits."""
    z = logits.float()
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logp.gather(1, safe[:, None])[:, 0]
    loss = (1 - smoothing) * nll - smoothing * logp.mean(-1) if smoothing else nll
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if grad:
        p = logp.exp()
        g = p - (smoothing / z.shape[-1])
        g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -(1 - smoothing)))
        if softcap > 0:
            g = g * (1 - t * t)
        g = g * (row_scale * valid)[:, None]
        logits.copy_(g)
    return loss


class _Cpu:
    @staticmethod
    def ce_rows(logits, labels, row_scale, ignore_index, smoothing, softcap, grad):
        return load_extension("cpu").ce_rows(logits, labels, row_scale, ignore_index, smoothing,
                                             softcap, grad)

    @staticmethod
    def bf16_matmul_amx() -> bool:
        # built only with AVX-512 BF16 (csrc/bindings/cpu_bf16_matmul.cpp)
        ext = load_extension("cpu")
        return hasattr(ext, "bf16_matmul_amx") and bool(ext.bf16_matmul_amx())

    @staticmethod
    def bf16_matmul_acc_(c, a, b, accumulate):
        load_extension("cpu").bf16_matmul_acc_(c, a, b, accumulate)


class _Torch:
    ce_rows = staticmethod(_ce_rows_torch)


_op.register("triton", all_of(triton_check, needs_dtypes(*fc.FLOATS)),
             triton_launchers("fastlm.triton_kernels.cross_entropy"))
_op.register("cpu", all_of(needs_device("cpu"), needs_dtypes(*fc.FLOATS),
                           extension_check("cpu", "ce_rows")), lambda: _Cpu)
_op.register("torch", lambda call: None, lambda: _Torch)


def _amx_matmul(impl) -> bool:
    """Whether ``impl`` (a backend's launchers) has the bf16 -> fp32 matmul on AMX tiles."""
    on_amx = getattr(impl, "bf16_matmul_amx", None)
    return on_amx is not None and bool(on_amx())


_MIN_CHUNK_ROWS = 256


def _chunk_rows(n: int, vocab: int, chunk_size: int | None, itemsize: int = 4,
                hidden: int = 0) -> int:
    if chunk_size:
        return chunk_size
    # ~16 MB of logits per chunk (2^22 in fp32, 2^23 in bf16/fp16), but not so few rows that
    # the LM-head GEMMs stop being compute-bound: every chunk reads the whole (vocab x hidden)
    # weight again, in the forward and twice in the gradients. From hidden 512 at least 256
    # rows: the LM-head matmul runs at ~70% of its rate at 83 rows (hidden 768, GPT-2's 50k
    # vocabulary in fp32; ~80% at 166 in bf16) and at full rate from ~256-332 (measured on the
    # CPU); such a chunk exceeds 16 MB (50 MB at 50k in fp32), still far from N x V. From hidden
    # 128 too (a 128k vocabulary left the 16 MB rule 32 fp32 rows or 65 bf16 ones: at hidden
    # 256, 2048 rows, fwd+bwd took 4.8 s in fp32 and 2.2 s in bf16, 3.2 s and 2.0 s at 256 and
    # 128 rows), at least 256 rows in fp32 and 128 in bf16/fp16, where passes over the
    # logits weigh more (hidden 128, 50k, bf16: 191 / 209 / 233 ms at 128 / 166 / 256 rows).
    rows = (1 << 24) // itemsize // max(1, vocab)
    if hidden >= 512 or (itemsize == 4 and hidden >= 128):
        rows = max(rows, _MIN_CHUNK_ROWS)
    elif hidden >= 128:
        rows = max(rows, _MIN_CHUNK_ROWS // 2)
    return max(1, min(n, rows))


def _chunked(impl, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             bias: torch.Tensor | None, row_scale: torch.Tensor, ignore_index: int,
             smoothing: float, softcap: float, chunk_size: int, want_grads: bool,
             head_grads: bool = True):
    """One pass over the rows in chunks: (loss per row fp32, and if want_grads the gradients
    of sum(row_scale * loss) in hidden, and if head_grads too in weight and bias (fp32); a
    frozen head (LoRA) skips the weight-gradient GEMM, a third of the head's work)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_grads else hidden.new_empty(0)
    step = _chunk_rows(n, vocab, chunk_size, hidden.element_size(), hidden.shape[1])
    # One chunk of bf16/fp16 logits: the weight gradient is computed as the unfused LM head's
    # backward computes it, one GEMM in the inputs' dtype (fp32 accumulation inside, rounded
    # once), on the CPU's bf16 units (AMX: ~4x the fp32 rate; the fp32 GEMM and the fp32
    # copies of the logits it needed made OPT's patched bf16 step 9% slower than unpatched).
    # Several chunks accumulate their products in fp32: rounding each chunk's would add up.
    # torch has no bf16 x bf16 -> fp32 matmul on the CPU, so that was an fp32 GEMM over fp32
    # copies; the cpu backend's own one (csrc/cpu/bf16_matmul.cpp) runs it on AMX tiles at
    # 2.4-3.4x that, where the CPU has them (elsewhere the fp32 GEMM is as fast).
    low_single = hidden.dtype in (torch.bfloat16, torch.float16) and n <= step
    head_grads = want_grads and head_grads
    amx_acc = (head_grads and not low_single and hidden.dtype == torch.bfloat16
               and _amx_matmul(impl))
    # written by the first chunk's matmul, accumulated in place after (no zero fill, no temp)
    dw = (torch.empty_like(weight, dtype=torch.float32) if head_grads and not low_single
          else hidden.new_empty(0))
    db = (torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
          if head_grads and bias is not None else hidden.new_empty(0))
    for s in range(0, n, step):
        h = hidden[s:s + step]
        logits = h @ weight.T  # (chunk, V) in the inputs' dtype, as the unfused LM head
        if bias is not None:
            logits = logits + bias
        losses[s:s + step] = impl.ce_rows(logits, labels[s:s + step], row_scale[s:s + step],
                                          ignore_index, smoothing, softcap, want_grads)
        if want_grads:  # logits now hold row_scale * dloss/dlogits
            torch.mm(logits, weight, out=dh[s:s + step])
            if not head_grads:
                continue
            if low_single:
                dw = torch.mm(logits.T, h).float()
            elif amx_acc:
                impl.bf16_matmul_acc_(dw, logits.T, h, s > 0)
            else:
                g, hf = ((logits, h) if logits.dtype == torch.float32
                         else (logits.float(), h.float()))
                if s == 0:
                    torch.mm(g.T, hf, out=dw)
                else:
                    dw.addmm_(g.T, hf)
            if bias is not None:
                db += logits.sum(0, dtype=torch.float32)
    return losses, dh, dw, db


@custom_op("fastlm::linear_cross_entropy")
def _fused(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
           bias: torch.Tensor | None, ignore_index: int, smoothing: float, softcap: float,
           sum_reduction: bool, chunk_size: int, want_grads: bool, head_grads: bool,
           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _op.launchers(Call.of(hidden), backend or None)
    n_valid = int((labels != ignore_index).sum())
    scale = 1.0 if sum_reduction else 1.0 / max(n_valid, 1)
    row_scale = torch.full((hidden.shape[0],), scale, dtype=torch.float32,
                           device=hidden.device)
    losses, dh, dw, db = _chunked(impl, hidden, weight, labels, bias, row_scale, ignore_index,
                                  smoothing, softcap, chunk_size, want_grads, head_grads)
    # summed in float64: the per-row losses are fp32, a long running total should not drift.
    # A tensor of its own, not a view (reshape): callers add to the loss in place (MoE models'
    # router loss), which autograd refuses on a view made inside a custom Function
    return (losses.sum(dtype=torch.float64) * scale).float(), dh, dw, db


@_fused.register_fake
def _(hidden, weight, labels, bias, ignore_index, smoothing, softcap, sum_reduction,
      chunk_size, want_grads, head_grads, backend):
    head = want_grads and head_grads
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden) if want_grads else hidden.new_empty(0),
            torch.empty_like(weight, dtype=torch.float32) if head else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0] if head and bias is not None else 0,
                             dtype=torch.float32))


def _setup(ctx, inputs, output):
    hidden, weight, _labels, bias = inputs[:4]
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def _last_use(dloss: torch.Tensor) -> bool:
    """Whether this backward may scale its saved gradients in place and return them.

    Only on the saved tensors' last use (no ``retain_graph``): autograd may adopt a returned
    tensor as ``.grad`` and accumulate into it later, which must not reach a buffer a second
    backward reads. It spares a fresh vocab x hidden buffer for the weight gradient: ~3 ms of a
    100 ms small-model step on a 2-core CPU, mostly the page faults of 8 MB, and the scaling
    pass itself when the seed is exactly 1 (``loss.backward()``). CPU only: on a GPU the seed
    check would cost a sync and fresh buffers come from the caching allocator. Traced (fake)
    tensors take the general path.
    """
    if type(dloss) is not torch.Tensor or dloss.device.type != "cpu":
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return keep_graph is not None and not keep_graph()
    except RuntimeError:  # not inside the autograd engine
        return False


def _backward(ctx, dloss, _dh, _dw, _db):
    dh, dw, db = ctx.saved_tensors
    w_dtype, b_dtype = ctx.dtypes
    want_b = b_dtype is not None and db.numel() > 0
    want_w = dw.numel() > 0  # not computed for a frozen head
    g = dloss.to(torch.float32)
    options = (None,) * 8  # labels and the non-tensor arguments
    if _last_use(dloss):
        if not bool(g == 1.0):  # gradient accumulation and loss scaling seed other values
            dh.mul_(g.to(dh.dtype))
            dw.mul_(g)
            db.mul_(g)
        return (dh, dw.to(w_dtype) if want_w else None, None,
                db.to(b_dtype) if want_b else None) + options
    grad_w = (dw * g).to(w_dtype) if want_w else None
    grad_b = (db * g).to(b_dtype) if want_b else None
    return (dh * g.to(dh.dtype), grad_w, None, grad_b) + options


_fused.register_autograd(_backward, setup_context=_setup)


# reduction="none": a loss per row, so the backward's incoming gradient differs per row and the
# weight's gradient cannot be computed ahead in the forward (its sum over rows would have to be
# taken before the rows' scales are known). The forward keeps only the per-row losses (no
# gradient buffers, nothing of size vocab); the backward runs the chunks again, each chunk's
# logits recomputed and turned into dloss[row] * dloss/dlogits by the same row kernel. One
# matmul more than the unfused head (4 instead of 3), still never the (rows x vocab) logits.
# With the head frozen (LoRA: DPO's usual setting) only the hidden states' gradient is wanted,
# and its rows scale independently: the forward computes it unscaled (rows x hidden) and the
# backward multiplies each row by its incoming gradient, the unfused head's 2 matmuls. A
# forward without gradients (DPO's reference, evaluation) is one matmul in chunks.
@custom_op("fastlm::linear_cross_entropy_rows")
def _rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
          bias: torch.Tensor | None, ignore_index: int, smoothing: float, softcap: float,
          chunk_size: int, hidden_grad_ahead: bool, backend: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _op.launchers(Call.of(hidden), backend or None)
    ones = (torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            if hidden_grad_ahead else hidden.new_empty(0, dtype=torch.float32))
    losses, dh, _, _ = _chunked(impl, hidden, weight, labels, bias, ones, ignore_index,
                                smoothing, softcap, chunk_size, hidden_grad_ahead, False)
    return losses, dh


@_rows.register_fake
def _(hidden, weight, labels, bias, ignore_index, smoothing, softcap, chunk_size,
      hidden_grad_ahead, backend):
    return (hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            torch.empty_like(hidden) if hidden_grad_ahead else hidden.new_empty(0))


@custom_op("fastlm::linear_cross_entropy_rows_bwd")
def _rows_bwd(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
              labels: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
              smoothing: float, softcap: float, chunk_size: int, head_grads: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _op.launchers(Call.of(hidden), backend or None)
    _, dh, dw, db = _chunked(impl, hidden, weight, labels, bias,
                             dloss.to(torch.float32).contiguous(), ignore_index, smoothing,
                             softcap, chunk_size, True, head_grads)
    return (dh, dw.to(weight.dtype) if head_grads else dw,
            db.to(bias.dtype) if head_grads and bias is not None else db)


@_rows_bwd.register_fake
def _(dloss, hidden, weight, labels, bias, ignore_index, smoothing, softcap, chunk_size,
      head_grads, backend):
    return (torch.empty_like(hidden),
            torch.empty_like(weight) if head_grads else hidden.new_empty(0),
            torch.empty_like(bias) if head_grads and bias is not None else hidden.new_empty(0))


def _rows_setup(ctx, inputs, output):
    ctx.options = inputs[4:]
    ctx.ahead = inputs[8]  # hidden_grad_ahead: the forward computed it, unscaled
    ctx.save_for_backward(*((output[1],) if ctx.ahead else inputs[:4]))


def _rows_backward(ctx, dloss, _ddh):
    nones = (None,) * len(ctx.options)
    if ctx.ahead:
        dh, = ctx.saved_tensors
        return ((dh.float() * dloss.float()[:, None]).to(dh.dtype), None, None, None) + nones
    hidden, weight, labels, bias = ctx.saved_tensors
    head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[3])
    *options, _ahead, backend = ctx.options
    dh, dw, db = _rows_bwd(dloss, hidden, weight, labels, bias, *options, head, backend)
    return (dh, dw if head else None, None, db if head and bias is not None else None) + nones


_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(softcap(hidden @ weight.T + bias), labels)`` without the full logits.

    Args:
        hidden: (N, H) (or (..., H), flattened) final hidden states, fp32/fp16/bf16.
        weight: (V, H) LM-head weight, same dtype; bias: (V,) or None.
        labels: (N,) int64 targets in [0, V) or ``ignore_index``.
        label_smoothing, softcap: as torch's cross_entropy and Gemma's final-logit soft-cap.
        reduction: "mean" (over non-ignored labels), "sum", or "none" (the loss of each row,
            shaped as labels, 0 where ignored; with a trainable head its backward recomputes
            the logits chunk by chunk, one matmul more than the unfused head, still never all
            of them; with a frozen one the forward computes the hidden states' gradient).
        chunk_size: rows per chunk (default: about 16 MB of logits per chunk, 4M in fp32,
            and at least 256 rows from hidden size 512).
    Returns:
        the fp32 loss (a scalar, or per row for "none"); differentiable in hidden, weight and
        bias.
    """
    op = "fused_linear_cross_entropy"
    hidden, weight, bias = autocast_inputs("lower", hidden, weight, bias)
    fc.check_float_tensor(op, "hidden", hidden)
    fc.check_float_tensor(op, "weight", weight)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if weight.dim() != 2 or weight.shape[1] != hidden2.shape[1]:
        fc.fail(op, f"weight must be (vocab, {hidden2.shape[1]}) to match hidden's last dim, "
                    f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        fc.fail(op, f"weight ({weight.dtype}, {weight.device}) must match hidden "
                    f"({hidden.dtype}, {hidden.device})")
    labels2 = labels.reshape(-1)
    if labels2.dtype != torch.long or labels2.numel() != hidden2.shape[0]:
        fc.fail(op, f"labels must be int64 with one entry per row of hidden "
                    f"({hidden2.shape[0]}), got {labels.dtype} {tuple(labels.shape)}")
    if bias is not None:
        fc.check_vector(op, "bias", bias, weight.T)
    if reduction not in ("mean", "sum", "none"):
        fc.fail(op, f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0 or softcap < 0 or not math.isfinite(softcap):
        fc.fail(op, "label_smoothing must be in [0, 1) and softcap >= 0")
    grad = torch.is_grad_enabled()
    want = grad and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    head = grad and any(t is not None and t.requires_grad for t in (weight, bias))
    if reduction == "none":
        rows, _ = _rows(hidden2.contiguous(), weight.contiguous(), labels2.contiguous(), bias,
                        int(ignore_index), float(label_smoothing), float(softcap),
                        int(chunk_size or 0), want and not head, backend or "")
        return rows.view(labels.shape)
    loss, *_ = _fused(hidden2.contiguous(), weight.contiguous(), labels2.contiguous(), bias,
                      int(ignore_index), float(label_smoothing), float(softcap),
                      reduction == "sum", int(chunk_size or 0), want, head, backend or "")
    return loss
