"""Rotary embeddings for ``fastlm.patch``.

transformers applies RoPE through a module-level function of each modeling file
(``modeling_llama.apply_rotary_pos_emb`` ...), called from the attention module's forward, so
there is no per-instance hook. fastlm puts a dispatcher in that one name, once per modeling
file: it calls the fused op only while a *patched* attention module is running (a context
variable its instance forward sets) and the original function otherwise. Unpatched models,
including other instances of the same class, keep HF's code path exactly; ``undo()`` removes
the instance forward, after which the dispatcher only passes calls through.

Not every ``apply_rotary_pos_emb`` is the rotate-half form (Cohere rotates adjacent pairs;
GLM rotates pairs with tables it rebuilds from HF's; GPT-J's takes other arguments), so each is
run once on random inputs against the fused op in each form it computes before its first swap;
the dispatcher then computes that form, and a function matching none is left alone, with the
reason.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import types

import torch


class _Flag:
    """Whether a patched attention module is running: a context variable in eager code (per
    thread and task), a plain attribute while dynamo traces, which cannot trace a
    ContextVar (fullgraph compiles of any model of a patched architecture failed on it)."""

    def __init__(self):
        self._var = contextvars.ContextVar("fastlm_rope_active", default=False)
        self._traced = False

    def get(self) -> bool:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: bool):
        if torch.compiler.is_compiling():
            before, self._traced = self._traced, value
            return before
        return self._var.set(value)

    def reset(self, token) -> None:
        if torch.compiler.is_compiling():
            self._traced = token
        else:
            self._var.reset(token)


_ACTIVE = _Flag()
_NAME = "apply_rotary_pos_emb"


def rope_target(module: torch.nn.Module):
    """(modeling file, None) when this attention module calls its modeling file's
    ``apply_rotary_pos_emb`` and that function is a RoPE form the fused op computes (``_FORMS``);
    (None, why) when it calls one that is not; (None, None) when it calls none."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    if code is None or _NAME not in code.co_names:
        return None, None
    modeling = sys.modules.get(type(module).__module__)
    fn = getattr(modeling, _NAME, None)
    if not callable(fn):
        return None, None
    why = _refusal(getattr(fn, "_fastlm_original", fn))
    if why is not None:
        return None, f"{modeling.__name__.rsplit('.', 1)[-1]}.{_NAME}: {why}"
    return modeling, None


_VERDICTS: dict = {}  # an original apply_rotary_pos_emb -> (its form, or None and why not)

# The forms the fused op computes: (name, the op's tables from the ones the function takes,
# interleaved, how many of the op's table columns one of the function's makes). Llama's rotates
# halves with the tables given; Cohere's rotates adjacent pairs with the tables given (its own
# are repeat-interleaved); GLM's rotates pairs with the first half of HF's halves-repeated
# tables, repeat-interleaved; GPT-OSS's rotates halves with half-width tables (one frequency a
# column), which the op's rotate-half form takes repeated.
_FORMS = (
    ("halves", lambda t: t, False, 1),
    ("pairs", lambda t: t, True, 1),
    ("pairs_from_halves", lambda t: t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1), True,
     1),
    ("halves_from_half_tables", lambda t: torch.cat([t, t], dim=-1), False, 2),
)


def _refusal(original) -> str | None:
    """Why ``original`` cannot be replaced by the fused op, or None. Checked once per function:
    HF's (q, k, cos, sin, ...) signature, then its result on random q, k and tables against
    the fused op's in each form it computes (rotate-half, Cohere's and GLM's interleaved
    pairs). GPT-J's takes (x, sin, cos): left alone instead of being rotated the wrong way."""
    return _verdict(original)[1]


def _verdict(original) -> tuple:
    if original not in _VERDICTS:
        _VERDICTS[original] = _probe(original)
    return _VERDICTS[original]


def _probe(original) -> tuple:
    """(form, None) for a function the fused op computes, else (None, why)."""
    why = _probe_signature(original)
    if why is not None:
        return None, why
    from fastlm.ops.rotary import rotary  # the op itself, whatever fastlm.ops.rotary is now

    gen = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    # float32 (ModernBERT's computes in q.float() whatever q is): a form that differs is off
    # by O(1), rounding by ~1e-7
    q, k = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(2))
    cos, sin = (torch.randn(1, 3, 8, generator=gen) for _ in range(2))
    outcomes = {}  # table width -> what the function returned or raised

    def run(width):
        if width not in outcomes:
            try:
                outcomes[width] = original(q, k, cos[..., :width], sin[..., :width])
            except Exception as exc:  # noqa: BLE001 - reported; the model keeps its own RoPE
                outcomes[width] = exc
        return outcomes[width]

    def matches(form, width) -> bool:
        _, tables, interleaved, _ = form
        want = run(width)
        if isinstance(want, Exception):
            return False
        c, s = cos[..., :width], sin[..., :width]
        got = rotary(q, k, tables(c), tables(s), interleaved=interleaved, backend="torch")
        return _same(got, want)

    # tables for the whole head: 8 columns, or 4 for a form whose columns count twice
    form = next((f for f in _FORMS if matches(f, 8 // f[3])), None)
    if form is None:
        if all(isinstance(o, Exception) for o in outcomes.values()):
            exc = next(iter(outcomes.values()))
            return None, f"a probe of it failed ({type(exc).__name__}: {exc})"
        return None, "it is none of the forms the fused op computes (rotate-half, pairs)"
    # tables narrower than the head (partial rotary: Phi-3, GPT-NeoX): the fused op rotates
    # the first dims and passes the rest; a function that cannot take such tables is never
    # called with them
    narrow = 4 // form[3]
    if not isinstance(run(narrow), Exception) and not matches(form, narrow):
        return None, "its partial rotary (tables narrower than the head) is not the fused op's"
    return form[0], None


def _probe_signature(original) -> str | None:
    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        params = []  # unreadable: the probe decides
    names = [p.name for p in params[:4]]
    # a hub-kernel wrapper shows (*args, **kwargs): the probe decides
    explicit = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[:4])
    if params and explicit and names != ["q", "k", "cos", "sin"]:
        return f"it takes ({', '.join(p.name for p in params)}), not HF's (q, k, cos, sin, ...)"
    return None


def _same(got, want) -> bool:
    return (isinstance(want, tuple) and len(want) == 2
            and all(torch.allclose(g.float(), w.float(), rtol=1e-5, atol=1e-5)
                    for g, w in zip(got, want)))


def _install(modeling) -> None:
    current = getattr(modeling, _NAME)
    if getattr(current, "_fastlm_dispatch", False):
        return
    form = next(f for f in _FORMS if f[0] == _verdict(current)[0])  # rope_target checked it
    if isinstance(current, torch.nn.Module):
        # With the `kernels` package installed, transformers makes the function a module object
        # (kernels' Func) that pickles by its name in the modeling file. The object stays and
        # its forward becomes the dispatcher: putting a function in the name instead broke
        # pickling every model of that file, patched or not.
        original = types.MethodType(type(current).forward, current)
        current.forward = _dispatcher(original, form)
    else:
        original = current
        setattr(modeling, _NAME, functools.wraps(current)(_dispatcher(current, form)))
        current = getattr(modeling, _NAME)
    current._fastlm_dispatch = True
    current._fastlm_original = original


def _dispatcher(original, form):
    _, tables, interleaved, columns = form

    def dispatch(q, k, cos, sin, *args, **kwargs):
        # Only HF's standard form: (B, H, S, D) q/k, (B, S, R) tables unsqueezed at dim 1,
        # the op's R even and <= D (a tiny StableLM's rotary dim of 1 gets tables of 2, which
        # HF's code broadcasts: its own result, not an error from the kernel)
        width = cos.shape[-1] * columns
        if (_ACTIVE.get() and not args and kwargs.get("unsqueeze_dim", 1) == 1
                and cos.dim() == 3 and q.dim() == 4 and k.dim() == 4
                and width % 2 == 0 and width <= q.shape[-1]):
            from fastlm.ops import rotary

            return rotary(q, k, tables(cos), tables(sin), interleaved=interleaved)
        return original(q, k, cos, sin, *args, **kwargs)

    return dispatch


def rope_forward(module: torch.nn.Module, modeling):
    """An instance forward for an attention module (``modeling``: its :func:`rope_target`)
    that turns the fused RoPE on around the class's own forward (same signature, for anything
    that inspects it)."""
    _install(modeling)
    cls_forward = type(module).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return cls_forward(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return forward
