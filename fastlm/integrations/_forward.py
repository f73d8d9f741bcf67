"""Installing and removing the per-instance forwards of ``fastlm.patch``.

A module under an accelerate hook (``from_pretrained(..., device_map=...)`` with offloaded
weights, ``dispatch_model``) has accelerate's wrapper as its instance ``forward``: it moves the
weights in from the CPU or disk, calls ``module._old_forward``, and moves them out. Setting
``forward`` over it dropped the hook, and the fused norm met its weight on the meta device.
There the fused forward goes in ``_old_forward``, where the wrapper calls it.
"""

from __future__ import annotations

import types


def _hooked(module) -> bool:
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


def foreign_forward(module) -> str | None:
    """Who replaced the module's forward on the instance, when someone other than fastlm or
    accelerate's hook did (None otherwise). transformers' tensor parallelism (``tp_plan``)
    wraps each split layer's forward this way, converting its inputs and outputs around the
    original: a fused forward set over it dropped the wrapper, and the split weight met whole
    inputs ("mixed torch.Tensor and DTensor")."""
    d = module.__dict__
    fwd = d.get("forward")
    if fwd is None or _hooked(module) or fwd is d.get("_fastlm_forward"):
        return None
    name = getattr(fwd, "__qualname__", type(fwd).__name__)
    if "TensorParallel" in name:
        return "transformers' tensor parallelism"
    return f"{getattr(fwd, '__module__', None) or '?'}.{name}"


def install_forward(module, fn) -> None:
    """Make ``fn(module, ...)`` the module's forward (under its accelerate hook, if any)."""
    bound = types.MethodType(fn, module)
    if _hooked(module):
        module.__dict__["_fastlm_hooked_original"] = module.__dict__["_old_forward"]
        module._old_forward = bound
    else:
        module.forward = bound
    module.__dict__["_fastlm_forward"] = bound
    module._fastlm_patched = True


def remove_forward(module) -> None:
    """Back to the module's own forward, leaving an accelerate hook in place."""
    d = module.__dict__
    ours = d.pop("_fastlm_forward", None)
    if "_fastlm_hooked_original" in d:  # patched under the hook
        module._old_forward = d.pop("_fastlm_hooked_original")
    elif ours is not None and _hooked(module) and d["_old_forward"] is ours:
        # hooked after the patch: the wrapper calls the fused forward; give it the class's
        module._old_forward = types.MethodType(type(module).forward, module)
    elif d.get("forward") is ours and ours is not None or ours is None and "forward" in d:
        del module.forward
    d.pop("_fastlm_patched", None)
