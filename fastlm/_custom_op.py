"""``custom_op``: a ``torch.library`` custom op with a fast eager path.

Every fastlm op is a ``torch.library`` custom op (with a fake implementation and autograd), so
it composes with ``torch.compile``, ``opcheck`` and tracing. Calling one eagerly, though, goes
through the dispatcher's Python layers (default filling, a redispatch below autograd, a
generated autograd.Function): ~100 us per forward and ~0.5 ms per forward + backward here,
more than the kernel itself for the small row ops (a 256 x 256 RMSNorm runs in ~10 us). In
a small model's training step that overhead alone cost more than the fusion saved.

So the object this decorator returns runs the op's own Python body directly in eager mode,
under a plain autograd.Function that calls the *same* ``setup_context`` and ``backward``
registered with torch.library; under ``torch.compile`` (or on fake/meta tensors) it calls the
registered op. One set of functions, two entry points: eager and compiled results agree by
construction, and tests/ops check both.

Convention: an op's outputs after the first exist only to be saved for its backward (softmax
statistics, norm statistics, the cross-entropy's precomputed gradients). The eager path marks
them non-differentiable and hands their backward ``None`` instead of materialised zeros (the
cross-entropy's weight gradient alone is a vocab x hidden buffer of them).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch


class _Eager(torch.autograd.Function):
    """The registered setup_context/backward, run as an ordinary autograd.Function."""

    @staticmethod
    def forward(ctx, op, *args):
        out = op._fn(*args)
        op._setup(ctx, args, out)
        ctx._fastlm_backward = op._backward
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(*out[1:])
            ctx.set_materialize_grads(False)
            # metadata, not the tensor (which would make a reference cycle through grad_fn)
            ctx._fastlm_first = (out[0].shape, out[0].dtype, out[0].device)
        return out

    @staticmethod
    def backward(ctx, *grads):
        if grads[0] is None:  # only when materialisation is off, i.e. for tuple outputs
            shape, dtype, device = ctx._fastlm_first
            grads = (torch.zeros(shape, dtype=dtype, device=device), *grads[1:])
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # as the inputs the op's backward was written for
        try:
            result = ctx._fastlm_backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, *(result if isinstance(result, tuple) else (result,)))


# False sends every call through the registered op (tests compare the two paths with it)
EAGER_FAST_PATH = True


def _classify(args) -> int:
    """_TRACED, _GRAD (eager, some input needs a gradient) or _PLAIN_CALL; one pass over args."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return _TRACED
    grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if (type(a) is not torch.Tensor and not isinstance(a, torch.nn.Parameter)
                    or a.is_meta):
                return _TRACED  # fake/functional tensors: let the dispatcher handle them
            grad = grad or a.requires_grad
    return _GRAD if grad and torch.is_grad_enabled() else _PLAIN_CALL


_TRACED, _GRAD, _PLAIN_CALL = range(3)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _without_autocast(fn):
    """fn with torch.autocast off while it runs. An op's inputs are cast once at its public
    function (fastlm/ops/_autocast.py); inside, autocast would recast the kernels' own matrix
    products and buffers (an fp32 ``out=`` buffer given a bf16 product failed). The dispatcher
    does not switch it off for a custom op (its autocast key falls through)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run


class FastOp:
    """What :func:`custom_op` returns: call it like the function it decorates."""

    def __init__(self, name: str, fn):
        fn = _without_autocast(fn)
        self._fn = fn
        self._sig = inspect.signature(fn)
        self._op = torch.library.custom_op(name, mutates_args=())(fn)
        self._setup = self._backward = None
        functools.update_wrapper(self, fn)

    @property
    def op(self):
        """The torch.library op (for opcheck and torch.ops.fastlm.<name>)."""
        return self._op

    def register_fake(self, fake):
        self._op.register_fake(fake)
        return fake

    def register_autograd(self, backward, *, setup_context):
        backward = _without_autocast(backward)
        self._op.register_autograd(backward, setup_context=setup_context)
        self._backward, self._setup = backward, setup_context

    def __call__(self, *args, **kwargs):
        if kwargs:
            bound = self._sig.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        kind = _classify(args)
        if kind == _PLAIN_CALL:
            return self._fn(*args)
        if kind == _GRAD and self._backward is not None:  # else torch.library says why not
            return _Eager.apply(self, *args)
        return self._op(*args)


def custom_op(name: str):
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` plus the eager fast path."""
    return lambda fn: FastOp(name, fn)
