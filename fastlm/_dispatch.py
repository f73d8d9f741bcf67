"""Backend registry and the one dispatch rule every fastlm op follows.

Each op owns an :class:`Op` listing its backends (``cuda``, ``triton``, ``cpu`` and ``torch``,
the reference, always available). Per call:

1. The requested backend is the ``backend=`` argument, else ``$FASTLM_BACKEND_<OP>``, else
   ``$FASTLM_BACKEND``, else ``auto``.
2. A named backend that cannot run this call raises :class:`BackendUnavailable` with its reason:
   the user asked for it, so quietly running something else would hide the problem.
3. ``auto`` walks the preference order for the tensors' device type (CUDA: cuda, triton, torch;
   CPU: cpu, torch) and takes the first backend that can run the call, logging one warning per
   distinct (op, skipped backend, reason) so a fallback is announced once, not every step.

A backend's ``check(call)`` returns None when it can run the call, else a short reason. Checks
are cheap; extension availability is computed once per process (see ``fastlm._build``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("fastlm")

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")

# os.environ.get costs ~0.7 us for an unset variable (it raises and catches KeyError inside),
# and every op call reads two variables: ~100 op calls per decoded token. On POSIX os.environ
# keeps its contents in a dict of encoded names, which every change made through os.environ
# (monkeypatch.setenv included) updates, so reading that dict gives the same answer for ~0.1 us.
# It is looked up on each call: libraries replace os.environ itself (datasets' map() with
# num_proc puts back a deep copy), and the copy has its own dict.
_POSIX = os.name == "posix"


def getenv(name: str, encoded: bytes | None = None) -> str | None:
    """``os.environ.get(name)``, cheaper (see above); ``encoded``: ``os.fsencode(name)``."""
    env = os.environ
    data = getattr(env, "_data", None) if _POSIX else None
    if type(data) is not dict:
        return env.get(name)
    value = data.get(encoded if encoded is not None else os.fsencode(name))
    return None if value is None else os.fsdecode(value)


DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us a call
class Call:
    """What a backend needs to know to decide whether it can run a call."""

    device: str  # torch device type: "cpu", "cuda", ...
    dtype: torch.dtype
    features: dict[str, Any] = field(default_factory=dict)  # op-specific: head_dim, causal, ...

    @staticmethod
    def of(tensor: torch.Tensor, **features: Any) -> Call:
        return Call(tensor.device.type, tensor.dtype, features)


@dataclass
class Backend:
    name: str
    check: Callable[[Call], str | None]
    impl: Callable[[], Any]  # returns the object holding the backend's launchers (lazy import)


@dataclass
class Op:
    """The backends of one op and its per-device preference order."""

    name: str
    order: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ORDER))
    backends: dict[str, Backend] = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False)
    # auto selections by (device, dtype, features) -> [backend name, skipped backends with
    # reasons, launcher object once launchers() asked]: the checks are pure functions of those
    # (availability is computed once per process), and a model calls each op ~100x a step
    _auto: dict = field(default_factory=dict, repr=False)
    _env: tuple = field(init=False, repr=False)  # (name, encoded name) of its two variables

    def __post_init__(self):
        self._env = tuple((var, os.fsencode(var)) for var in self.env_vars())

    def register(self, name: str, check: Callable[[Call], str | None], impl: Callable[[], Any]):
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend name {name!r} is not one of {BACKEND_NAMES}")
        self.backends[name] = Backend(name, check, impl)
        self._auto.clear()

    def env_vars(self) -> tuple[str, str]:
        return f"FASTLM_BACKEND_{self.name.upper()}", "FASTLM_BACKEND"

    def requested(self, backend: str | None) -> tuple[str, str]:
        """(name, where it came from) of the requested backend; name may be "auto"."""
        if backend is not None:
            return backend, "the backend= argument"
        for var, encoded in self._env:
            value = (getenv(var, encoded) or "").strip()
            if value:
                return value, f"${var}"
        return "auto", "default"

    def launchers(self, call: Call, backend: str | None = None) -> Any:
        """``select(call, backend).impl()``: the object holding the chosen backend's launchers,
        kept with an auto selection (impl() imports or loads on each call: ~1 us)."""
        if self.requested(backend)[0] != "auto":
            return self.select(call, backend).impl()
        key = self._key(call)
        entry = self._auto.get(key) if key is not None else None
        if entry is None or entry[2] is None:
            impl = self.select(call, backend).impl()
            entry = self._auto.get(key) if key is not None else None
            if entry is not None:
                entry[2] = impl
            return impl
        self._warn_fallback(entry[0], entry[1])
        return entry[2]

    @staticmethod
    def _key(call: Call):
        features = call.features
        key = (call.device, call.dtype,
               tuple(sorted(features.items())) if len(features) > 1 else tuple(features.items()))
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def reason_unavailable(self, name: str, call: Call) -> str | None:
        backend = self.backends.get(name)
        if backend is None:
            return f"op '{self.name}' has no '{name}' backend"
        try:
            return backend.check(call)
        except Exception as exc:  # a broken check must not take the op down with it
            return f"availability check failed: {type(exc).__name__}: {exc}"

    def select(self, call: Call, backend: str | None = None) -> Backend:
        name, source = self.requested(backend)
        if name != "auto":
            if name not in self.backends:
                raise ValueError(
                    f"unknown backend {name!r} for op '{self.name}' (from {source}); "
                    f"choose one of {sorted(self.backends)} or 'auto'"
                )
            reason = self.reason_unavailable(name, call)
            if reason is not None:
                raise BackendUnavailable(
                    f"backend '{name}' (requested by {source}) cannot run op '{self.name}' "
                    f"on {call.device} {call.dtype}: {reason}. Use backend='auto' to fall back "
                    f"automatically, or another backend."
                )
            return self.backends[name]
        key = self._key(call)
        if key is not None and key in self._auto:
            chosen, skipped, _ = self._auto[key]
            self._warn_fallback(chosen, skipped)  # once per reason, even after a clear()
            return self.backends[chosen]
        skipped = []
        for candidate in self.order.get(call.device, ("torch",)):
            reason = self.reason_unavailable(candidate, call)
            if reason is None:
                self._warn_fallback(candidate, skipped)
                if key is not None:
                    self._auto[key] = [candidate, skipped, None]  # None: launchers()
                return self.backends[candidate]
            skipped.append((candidate, reason))
        # Unreachable in practice: the torch reference accepts every call.
        raise BackendUnavailable(
            f"no backend of op '{self.name}' can run on {call.device} {call.dtype}: "
            + "; ".join(f"{n}: {r}" for n, r in skipped)
        )

    def _warn_fallback(self, chosen: str, skipped: list[tuple[str, str]]) -> None:
        for name, reason in skipped:
            key = (name, reason)
            if key in self._warned:
                continue
            self._warned.add(key)
            logger.warning(
                "fastlm: op '%s' falls back from backend '%s' to '%s': %s",
                self.name, name, chosen, reason,
            )

    def describe(self, call: Call) -> list[tuple[str, str]]:
        """(backend, status) for every backend in preference order, for ``fastlm env``."""
        names = list(self.order.get(call.device, ())) + [
            n for n in self.backends if n not in self.order.get(call.device, ())
        ]
        chosen = None
        rows = []
        for name in names:
            reason = self.reason_unavailable(name, call)
            in_order = name in self.order.get(call.device, ())
            if reason is None and chosen is None and in_order:
                chosen = name
                rows.append((name, "selected"))
            elif reason is None:
                rows.append((name, "available" if in_order else "available on explicit request"))
            else:
                rows.append((name, f"unavailable: {reason}"))
        return rows


OPS: dict[str, Op] = {}


def define_op(name: str, order: dict[str, tuple[str, ...]] | None = None) -> Op:
    """Create (once) and return the registry of op ``name``."""
    if name not in OPS:
        OPS[name] = Op(name, dict(order) if order else dict(DEFAULT_ORDER))
    return OPS[name]


# -- availability checks shared by the ops ----------------------------------------------------


def needs_device(*devices: str) -> Callable[[Call], str | None]:
    def check(call: Call) -> str | None:
        if call.device not in devices:
            return f"runs on {'/'.join(devices)} tensors only, got {call.device}"
        return None

    return check


def needs_dtypes(*dtypes: torch.dtype) -> Callable[[Call], str | None]:
    def check(call: Call) -> str | None:
        if call.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"supports {names}, got {str(call.dtype).removeprefix('torch.')}"
        return None

    return check


def extension_check(name: str, op_name: str) -> Callable[[Call], str | None]:
    """Extension ``name`` loads and registers ``op_name`` (a stale prebuilt one may not)."""

    def check(call: Call) -> str | None:
        from fastlm._build import extension_unavailable_reason, load_extension

        reason = extension_unavailable_reason(name)
        if reason is None and not hasattr(load_extension(name), op_name):
            reason = f"extension '{name}' has no op '{op_name}' (a stale build? rebuild it)"
        return reason

    return check


def triton_check(call: Call) -> str | None:
    """Triton runs CUDA tensors, or CPU tensors inside its interpreter (tests only)."""
    if call.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing triton"
    if call.device not in ("cpu", "cuda"):
        return f"Triton does not run {call.device} tensors"
    if call.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc}); pip install triton"
    return None


def all_of(*checks: Callable[[Call], str | None]) -> Callable[[Call], str | None]:
    """A check that passes when every check passes; the first failing reason is reported."""

    def check(call: Call) -> str | None:
        for c in checks:
            reason = c(call)
            if reason is not None:
                return reason
        return None

    return check


def triton_launchers(module_name: str) -> Callable[[], Any]:
    """A triton backend's ``impl``: the launcher module, each public function of which runs
    with its tensors' GPU made the current device (see :class:`_OnTensorsDevice`)."""
    state: dict[str, Any] = {}

    def load():
        if "module" not in state:
            import importlib

            state["module"] = _OnTensorsDevice(importlib.import_module(module_name))
        return state["module"]

    return load


class _OnTensorsDevice:
    """Triton launches a kernel on the *current* CUDA device, whatever device its tensors are
    on: a model spread over GPUs (``device_map="auto"``) or kept off GPU 0 ran its layers on
    cuda:1 with cuda:0 current, and every fused norm raised "Pointer argument cannot be
    accessed from Triton". Each launcher now runs under its first CUDA tensor's device (the
    CUDA extension's bindings hold a device guard already); no switch when it is current."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        fn = getattr(self._module, name)
        if name.startswith("_") or not callable(fn):
            return fn
        module = self._module

        def run(*args, **kwargs):
            launch = getattr(module, name)  # at call time: a launcher replaced later counts
            dev = _first_cuda_device(args) or _first_cuda_device(kwargs.values())
            if dev is None or dev.index is None or dev.index == torch.cuda.current_device():
                return launch(*args, **kwargs)
            with torch.cuda.device(dev):
                return launch(*args, **kwargs)

        run.__name__ = run.__qualname__ = name
        run.__doc__ = fn.__doc__
        self.__dict__[name] = run  # the wrapper is made once
        return run


def _first_cuda_device(values) -> torch.device | None:
    for v in values:
        if isinstance(v, (list, tuple)):  # AdamW's tensor lists
            v = next((t for t in v if isinstance(t, torch.Tensor)), None)
        if isinstance(v, torch.Tensor):
            return v.device if v.device.type == "cuda" else None
    return None
