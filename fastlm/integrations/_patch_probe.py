"""A swapped-in forward is checked against the module's own before ``fastlm.patch`` keeps it.

``patch`` recognises modules by class name and attributes (a ``...RMSNorm`` with a weight, an
MLP with gate/up/down projections), which is how it serves architectures it was never written
for. A convention that such a match cannot see (a norm scaling by ``1 + weight`` under another
class name, an MLP gating the other projection) would make the swap silently wrong. So each
candidate runs once on a small random input, through the class's forward and the fused one;
where they disagree the module is left alone and the handle says why.

Not probed (the class match stands): weights on the meta device or partitioned by DeepSpeed
ZeRO-3 (nothing to compute with), sharded (DTensor) weights of a module that cannot be copied
(FSDP2 refuses to deep-copy a module it wraps), and modules whose input width cannot be read. ``patch``
probes one module per class, parameter layout and plain attributes, and reuses the verdict.
"""

from __future__ import annotations

import copy

import torch

from fastlm._dtensor import is_dtensor

# max |fused - own| / max |own| allowed: fp32 kernels agree to ~1e-6; 16-bit results round
# once where HF rounds every intermediate (a few bf16 ulps, 2^-8 each). A wrong convention
# is off by O(1).
_TOL = {torch.float32: 1e-3, torch.float64: 1e-3}
_TOL_16BIT = 5e-2


def _width(module: torch.nn.Module) -> int | None:
    """The last dimension the module's forward takes."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # norms
        return weight.shape[0]
    shape = getattr(module, "normalized_shape", None)  # a LayerNorm without a weight
    if isinstance(shape, tuple) and len(shape) == 1:
        return shape[0]
    for name in ("gate_proj", "gate_up_proj", "up_proj", "fc1"):  # MLPs
        proj = getattr(module, name, None)
        width = getattr(proj, "in_features", None)
        if isinstance(width, int):
            return width
    if not list(module.parameters()):  # a bare activation: any width
        return 8
    return None


def _plain(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module itself, or, where FSDP2 (``fully_shard``) or tensor parallelism made its
    parameters DTensors, a copy with plain random ones of the same shapes: the probe checks the forward's formula,
    which any values show, and a DTensor weight met the probe's plain input in an error (the
    model's norms and MLPs were left unfused, the reason naming DTensors)."""
    sharded = [p for p in module.parameters() if is_dtensor(p)]
    if not sharded:
        return module
    gen = torch.Generator().manual_seed(1)
    # the copy gets the stand-ins in place of the DTensors, which are never copied: a deepcopy
    # of a tensor-parallel weight (transformers' tp_plan) failed ("copy_() on an invalid python
    # storage") and took the whole patch down with it
    memo = {id(p): torch.nn.Parameter(
        torch.randn(tuple(p.shape), generator=gen).to(p.device, p.dtype), requires_grad=False)
        for p in sharded}
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - e.g. FSDP2 refuses to deep-copy a module it wraps
        return None  # (transformers' DistributedConfig(fsdp_size=...) wraps norms and MLPs)


def disagrees(module: torch.nn.Module, fwd) -> str | None:
    """None when ``fwd(module, x)`` matches ``type(module).forward(module, x)`` on a random x
    (or the module cannot be probed); otherwise why the swap would be wrong."""
    module = _plain(module)
    if module is None:  # sharded and cannot be copied: the class match stands, as for ZeRO-3
        return None
    params = list(module.parameters())
    if any(p.is_meta or p.numel() == 0 for p in params):
        return None
    width = _width(module)
    if width is None:
        return None
    floats = [p for p in params if p.is_floating_point()]  # (quantised weights are not)
    dtype = floats[0].dtype if floats else torch.float32
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    # rows with a mean well away from 0: on zero-mean rows a LayerNorm and an RMSNorm differ
    # by only ~1/sqrt(width), which passed the 16-bit tolerance (CPMAnt's RMS norm, named
    # CpmAntLayerNorm, got a LayerNorm in bf16: logits off by 100%)
    x = torch.randn(3, width, generator=gen) + torch.tensor([[1.0], [-1.5], [2.0]])
    x = x.to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            want = type(module).forward(module, x)
            got = fwd(module, x)
    except Exception as exc:  # noqa: BLE001 - reported, and the module keeps its forward
        return f"a probe of its forward failed ({type(exc).__name__}: {exc})"
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return f"its forward returns {type(want).__name__}, not one tensor"
    if got.shape != want.shape:
        return f"the fused forward gives shape {tuple(got.shape)}, its own {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    tol = _TOL.get(dtype, _TOL_16BIT)
    if not err <= tol * max(scale, 1e-6):  # (NaN fails too)
        return (f"the fused forward differs from its own on a probe (max error {err:.3g}, "
                f"values up to {scale:.3g}): a convention fastlm does not know")
    return None
