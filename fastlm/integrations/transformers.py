"""``attn_implementation="fastlm"`` for Hugging Face transformers, registered lazily.

``import fastlm`` calls :func:`register`, which must stay cheap: importing transformers takes
seconds and many fastlm users never touch it. So this module imports only the standard library.

- If ``transformers.modeling_utils`` is already imported, :func:`register` registers at once.
- Otherwise it installs a one-shot import hook: the moment transformers finishes importing
  ``modeling_utils`` (which ``from_pretrained``, ``from_config`` and every model class need),
  the attention function and its mask function are registered under the name ``"fastlm"``.

Either way, ``from_pretrained(..., attn_implementation="fastlm")``, ``from_config(...)`` and
``model.set_attn_implementation("fastlm")`` work after ``import fastlm``, in any import order.
The attention function and the mask format live in :mod:`fastlm.integrations._hf_attention`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading

__all__ = ["NAME", "register", "is_registered"]

NAME = "fastlm"
_TRIGGER = "transformers.modeling_utils"  # defines AttentionInterface; imports masking_utils
_logger = logging.getLogger("fastlm")
_lock = threading.RLock()  # re-entrant: registering may import modules
_state = {"registered": False, "hook": None}


@contextlib.contextmanager
def quiet(name: str = "transformers"):
    """transformers' warnings under logger ``name`` held back while fastlm reads or builds
    something whose warning is not the user's doing (the logger's level raised, then put
    back)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def register() -> None:
    """Make ``attn_implementation="fastlm"`` available to transformers; cheap and idempotent.

    Never imports transformers itself: registers now if it is loaded, else when it loads.
    """
    with _lock:
        if _state["registered"]:
            return
        module = sys.modules.get(_TRIGGER)
        if module is not None and hasattr(module, "AttentionInterface"):
            _register_now()
        elif _state["hook"] is None:
            _state["hook"] = _PostImportHook()
            sys.meta_path.insert(0, _state["hook"])


def is_registered() -> bool:
    """True once the attention and mask functions are in transformers' registries."""
    return _state["registered"]


def _register_now() -> None:
    # Importing _hf_attention registers (last statement of that module). If it is itself the
    # module whose import pulled in modeling_utils, it is half-initialised here and registers
    # when it finishes, so there is nothing to do.
    importlib.import_module("fastlm.integrations._hf_attention")


def _mark_registered() -> None:
    _state["registered"] = True


def _on_trigger_loaded() -> None:
    with _lock:
        hook = _state["hook"]
        if hook is not None and hook in sys.meta_path:
            sys.meta_path.remove(hook)
        _state["hook"] = None
        try:
            _register_now()
        except Exception as exc:  # never break the user's `import transformers`
            _logger.warning("fastlm: could not register attn_implementation='fastlm': %r", exc)


class _PostImportHook:
    """A ``sys.meta_path`` finder that runs :func:`_on_trigger_loaded` after ``_TRIGGER`` loads.

    It finds nothing itself: it asks the other finders for the real spec and wraps only that
    spec's loader instance, so the module object, ``__loader__`` and ``__spec__`` stay the
    ones Python would have made.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            _on_trigger_loaded()

        loader.exec_module = exec_then_register  # this loader instance serves only _TRIGGER
        return spec
