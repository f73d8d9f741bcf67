"""fastlm: fused attention and optimizer kernels for fast GPT training.

``import fastlm`` is cheap: the ops, the optimizer and the trainer are imported on first use
(``fastlm.ops``, ``fastlm.optim``, ...). It registers ``attn_implementation="fastlm"`` with
transformers (when transformers is imported, not before) and offers ``fastlm.patch(model)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _alias_triton_kernels() -> None:
    """Make ``fastlm.triton_kernels`` importable from an uninstalled source checkout.

    An installed fastlm maps the top-level ``triton_kernels/`` folder to the subpackage
    ``fastlm.triton_kernels`` (pyproject/setup.py), so there is never a top-level
    ``triton_kernels`` module to clash with another distribution. A checkout used through
    PYTHONPATH has no such mapping; point the subpackage at the folder ourselves.
    """
    name = __name__ + ".triton_kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "triton_kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_alias_triton_kernels()

_LAZY = {"ops", "optim", "data", "bench", "integrations", "train", "nn"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "patch":
        from fastlm.integrations.patch import patch

        return patch
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """``attn_implementation="fastlm"`` for transformers, without importing it now (the
    registration happens when transformers loads; see fastlm/integrations/transformers.py)."""
    from fastlm.integrations import transformers as hf

    hf.register()


_register_with_transformers()
