"""The mask function registered as ``"fastlm"`` in transformers' ``AttentionMaskInterface``.

transformers builds one mask per forward (per layer type) by calling the mask function
registered under ``config._attn_implementation``. Its sdpa/eager functions materialise a
(B, 1, Sq, Sk) tensor; fastlm's kernels take the pattern instead: causal, a sliding window and
a (B, Sk) key-padding mask, or (B, S) segment ids for sequences packed into rows (transformers
detects those from position ids that restart). :func:`fastlm_mask` returns that pattern as a
:class:`FastlmMask` when the mask transformers asked for is exactly one the kernels compute,
and otherwise the dense boolean mask (the attention function then runs transformers' own path,
with a warning).

Which pattern transformers asked for is read from its ``mask_function``: the building blocks
of ``transformers.masking_utils`` are recognised by identity (their code objects), never by
name, so a custom or composed function we do not know always takes the dense path.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import masking_utils as mu

_logger = logging.getLogger("fastlm")

__all__ = ["FastlmMask", "fastlm_mask"]

UNBOUNDED = -1

# Code objects of the closures masking_utils builds: a closure is recognised by its code, and its
# parameters (the window size, the functions it combines) are read from its cells.
_AND_CODE = mu.and_masks(mu.causal_mask_function).__code__
_SLIDING_CODE = mu.sliding_window_overlay(1).__code__
_SLIDING_BIDIR_CODE = mu.sliding_window_bidirectional_overlay(1).__code__
_REMAP_CODE = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, None).__code__
_PACKED_CODE = mu.packed_sequence_mask_function(None).__code__


@dataclass(eq=False)
class FastlmMask:
    """One forward's attention pattern in the form ``fastlm.ops.attention`` takes.

    Positions are aligned bottom-right as in the kernels: query ``i`` of ``Sq`` sits at key
    ``i + kv_used - Sq``. Keys past ``kv_used`` (the unwritten tail of a static cache) are
    visible to no query and are sliced off before the kernel runs.
    """

    causal: bool
    window: tuple[int, int]  # (left, right) around the aligned position, -1 = unbounded
    key_padding_mask: torch.Tensor | None  # (B, kv_used) bool, True = attend; None = no padding
    kv_used: int  # number of leading keys any query can see
    kv_length: int  # number of keys transformers' mask covers
    dense_args: dict = field(repr=False)  # arguments that rebuild the dense mask for fallbacks
    segment_ids: torch.Tensor | None = None  # (B, S) packed sequences, one id per run
    # generate() with a static cache builds the mask once per step and hands it back to the
    # model as its attention_mask, where transformers' mask code reads .ndim (2 would mean a
    # padding mask to convert); fastlm_mask then rebuilds from the 2D mask this one came from
    ndim = 4
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """(B, 1, Sq, kv_length) bool, True = attend: what transformers' sdpa path would use."""
        if self._dense is None:
            self._dense = _dense_mask(self.dense_args)
        return self._dense

    def dense_additive(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, Sq, kv_length) float: 0 where attended, dtype's minimum elsewhere (eager)."""
        return to_additive(self.dense(), dtype)

    # -- read as a tensor -------------------------------------------------------------------
    # Some models' attention code reads the mask itself (Doge's dynamic mask, HunYuan v4's
    # sparse indexer: `mask.dtype`, `mask[...]`, `mask & m`, `torch.where(mask, ...)`;
    # BigBird-Pegasus's encoder: `scores + mask`); FastlmMask crashed them. Read as a tensor it
    # is the dense bool mask transformers' sdpa path would have given them, or eager's additive
    # one where it is added (built on first such read); what they pass on is then a plain
    # tensor, which the attention function sends to sdpa.
    dtype = torch.bool

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __getitem__(self, index):
        return self.dense()[index]

    def __invert__(self):
        return ~self.dense()

    def __and__(self, other):
        return self.dense() & other

    __rand__ = __and__

    def __or__(self, other):
        return self.dense() | other

    __ror__ = __or__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Added to scores, a mask is additive (eager's `scores + mask`, BigBird-Pegasus's
        # encoder): the bool mask there would add 1 to what is attended and 0 to the rest, a
        # silently wrong softmax. It is 0 / the dtype's minimum in that one use.
        additive = func in _ADDITIVE_OPS
        dtype = next((a.dtype for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.is_floating_point()), torch.float32)

        def unwrap(x):
            if isinstance(x, FastlmMask):
                return x.dense_additive(dtype) if additive else x.dense()
            if isinstance(x, (list, tuple)):
                return type(x)(unwrap(v) for v in x)
            return x

        return func(*unwrap(tuple(args)), **{k: unwrap(v) for k, v in kwargs.items()})


_ADDITIVE_OPS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
                 torch.Tensor.__radd__, torch.Tensor.__iadd__}


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def _dense_mask(args: dict) -> torch.Tensor:
    return mu.sdpa_mask(**args, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)


_INTERFACE_USERS: dict = {}  # model type -> whether its modeling file calls the interface


def _uses_attention_interface(model_type) -> bool:
    """Whether the model type's attention goes through transformers' AttentionInterface (its
    modeling file looks functions up in ALL_ATTENTION_FUNCTIONS). Unknown: assumed so."""
    if model_type not in _INTERFACE_USERS:
        uses = True
        try:
            from transformers.models.auto.configuration_auto import model_type_to_module_name

            name = model_type_to_module_name(model_type)
            modeling = sys.modules.get(f"transformers.models.{name}.modeling_{name}")
            if modeling is not None:
                uses = hasattr(modeling, "ALL_ATTENTION_FUNCTIONS")
        except Exception:  # noqa: BLE001 - the check is a courtesy: never fail a forward on it
            pass
        if not uses:
            _logger.warning(
                "attn_implementation='fastlm': %s models run their own attention code, not "
                "transformers' attention interface; nothing is fused there (they run as eager)",
                model_type)
        _INTERFACE_USERS[model_type] = uses
    return _INTERFACE_USERS[model_type]


def _cells(fn) -> dict:
    names = fn.__code__.co_freevars
    return dict(zip(names, (c.cell_contents for c in fn.__closure__ or ())))


def _recognise(fn) -> tuple[int, int] | None:
    """(left, right) window of a masking_utils mask function, or None if not recognised.

    Distances d = query position - key position; causal is right = 0, unbounded is -1.
    """
    if fn is mu.causal_mask_function:
        return UNBOUNDED, 0
    if fn is mu.bidirectional_mask_function:
        return UNBOUNDED, UNBOUNDED
    code = getattr(fn, "__code__", None)
    if code is _SLIDING_CODE:  # kv > q - w  <=>  d <= w - 1
        w = _cells(fn).get("sliding_window")
        return (w - 1, UNBOUNDED) if isinstance(w, int) and w >= 1 else None
    if code is _SLIDING_BIDIR_CODE:  # |d| <= w
        w = _cells(fn).get("sliding_window")
        return (w, w) if isinstance(w, int) and w >= 0 else None
    if code is _AND_CODE:
        parts = [_recognise(part) for part in _cells(fn).get("mask_functions", ())]
        if not parts or any(p is None for p in parts):
            return None
        return _tightest([p[0] for p in parts]), _tightest([p[1] for p in parts])
    return None


def _packed(fn):
    """(inner mask function, (B, S) segment ids) if ``fn`` is transformers' packed-sequence
    form, ``and_masks(remap_positions(inner, position_ids), packed_sequence(ids))``, else None.

    Within one run of ids the position ids step by exactly 1 (a run ends wherever they do not:
    that is how transformers finds the runs), so ``inner`` on remapped positions is ``inner`` on
    the run's own indices: the pattern the varlen kernels apply to each sequence.
    """
    if getattr(fn, "__code__", None) is not _AND_CODE:
        return None
    parts = _cells(fn).get("mask_functions", ())
    if len(parts) != 2:
        return None
    remap, packed = parts
    if getattr(remap, "__code__", None) is not _REMAP_CODE or \
            getattr(packed, "__code__", None) is not _PACKED_CODE:
        return None
    ids = _cells(packed).get("packed_sequence_mask")
    return (_cells(remap).get("mask_function"), ids) if isinstance(ids, torch.Tensor) else None


def _read(fn) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    """(segment ids if ``fn`` is the packed-sequence form else None, the window of ``fn``, or
    of its inner function when packed; None if not recognised)."""
    packed = _packed(fn)
    if packed is not None:
        return packed[1], _recognise(packed[0])
    return None, _recognise(fn)


# Dynamo cannot read a closure's cells (a window size, packed sequence ids): traced, reading
# them raised and the whole forward fell back to eager. Run for real instead, with a graph break
# before the layers; the window comes back as an int (guarded on), the ids as a tensor.
_read_outside_graph = torch.compiler.disable(_read)


def _graph_may_break() -> bool:
    """False when the trace must stay one graph (``fullgraph=True``, error_on_graph_break)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return not (tx.one_graph or getattr(tx, "error_on_graph_break", False))
    except Exception:  # noqa: BLE001 - a private API: if it moved, never break the graph
        return False


# runs for real while the graph is traced (its result taken as a constant)
_graph_may_break_traced = torch._dynamo.assume_constant_result(_graph_may_break)


def _traced_by_dynamo() -> bool:
    """Whether dynamo is tracing this code (torch.compile, strict torch.export). Non-strict
    torch.export (its default) runs the forward as Python on traced tensors: a closure's cells
    read as they do in eager code, and the attention stays fused in the exported graph."""
    return torch.compiler.is_compiling() and (torch.compiler.is_dynamo_compiling()
                                              or not torch.compiler.is_exporting())


def _packed_mask(ids, window, q_length, kv_length, q_offset, kv_offset, attention_mask,
                 dense_args):
    offsets = (_as_int(q_offset), _as_int(kv_offset))
    if (window is None or attention_mask is not None or offsets != (0, 0)
            or q_length != kv_length or tuple(ids.shape[1:]) != (q_length,)):
        return _dense_mask(dense_args)
    return FastlmMask(
        causal=window[1] == 0, window=window, key_padding_mask=None, kv_used=kv_length,
        kv_length=kv_length, dense_args=dense_args, segment_ids=ids,
    )


def _tightest(bounds: list[int]) -> int:
    bounded = [b for b in bounds if b != UNBOUNDED]
    return min(bounded) if bounded else UNBOUNDED


def _as_int(x) -> int | None:
    """A Python int for an offset; None if it is a tensor being traced (value unknown)."""
    if isinstance(x, torch.Tensor):
        if torch.compiler.is_compiling():
            return None
        return int(x)
    return int(x)


def _padding(attention_mask, kv_length: int, kv_offset: int, kv_used: int):
    """(B, kv_used) bool key-padding mask, or None when no key is padded."""
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_used].to(torch.bool)
    if not torch.compiler.is_compiling() and bool(padding.all()):
        return None  # no padding: the kernels skip the mask entirely
    return padding


def _same_geometry(args: dict, batch_size, q_length, kv_length, q_offset, kv_offset) -> bool:
    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return a is b
        return a == b

    return all(same(args[k], v) for k, v in (
        ("batch_size", batch_size), ("q_length", q_length), ("kv_length", kv_length),
        ("q_offset", q_offset), ("kv_offset", kv_offset)))


def fastlm_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=mu.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> FastlmMask | torch.Tensor:
    """transformers' mask-interface signature; returns a FastlmMask or a dense bool mask."""
    if isinstance(attention_mask, FastlmMask):
        if _same_geometry(attention_mask.dense_args, batch_size, q_length, kv_length, q_offset,
                          kv_offset):
            # This forward's mask, built by an outer model (PaliGemma builds it and hands it to
            # its language model, which asks again without the position ids): kept as eager
            # keeps a 4D mask. Rebuilt, it lost what the outer call saw (the packed sequences).
            return attention_mask
        # pre-built by generate() for other sizes, see FastlmMask.ndim: rebuilt from its 2D mask
        attention_mask = attention_mask.dense_args["attention_mask"]
    config = kwargs.get("config")
    if config is not None and not _uses_attention_interface(getattr(config, "model_type", None)):
        # A model with its own attention code (BLOOM, MPT, XGLM) takes any registered name and
        # then reads this mask itself: FastlmMask crashed it (`scores + mask`). It gets the mask
        # its eager code takes, and runs as eager.
        return mu.eager_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            dtype=kwargs.get("dtype", torch.float32), use_vmap=use_vmap, device=device)
    dense_args = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, use_vmap=use_vmap, device=device,
    )
    code = getattr(mask_function, "__code__", None)
    read = _read
    if _traced_by_dynamo() and code is not None and code.co_freevars:
        # A closure (sliding windows; packed sequences, which a traced forward always adds: it
        # cannot check the position ids while tracing) is read outside the graph. Where the
        # graph may not break, the dense mask traces and the sdpa fallback runs (announced).
        if not _graph_may_break_traced():
            return _dense_mask(dense_args)
        read = _read_outside_graph
    ids, window = read(mask_function)
    if ids is not None:
        return _packed_mask(ids, window, q_length, kv_length, q_offset, kv_offset,
                            attention_mask, dense_args)
    if window is None:  # chunked or blockwise attention, custom overlays
        return _dense_mask(dense_args)
    left, right = window
    kv_used = kv_length
    if left != UNBOUNDED or right != UNBOUNDED:
        # Positional limits need the kernels' bottom-right alignment: the last query must sit
        # on the last used key. q_offset is a tensor under a static cache (to avoid recompiles).
        q_start = _as_int(q_offset)
        if q_start is None:
            return _dense_mask(dense_args)
        kv_used = q_start + q_length - kv_offset
        # A shorter span is exact only when nothing past the last query is visible (causal).
        if kv_used < 1 or kv_used > kv_length or (kv_used < kv_length and right != 0):
            return _dense_mask(dense_args)
    padding = _padding(attention_mask, kv_length, kv_offset, kv_used)
    return FastlmMask(
        causal=right == 0, window=(left, right), key_padding_mask=padding, kv_used=kv_used,
        kv_length=kv_length, dense_args=dense_args,
    )
