"""FusedAdamW: torch.optim.AdamW's semantics and state format, one fused pass per step.

An fp32 AdamW step is pure memory traffic (read param, grad, m, v; write param, m, v: 28 bytes
per parameter). The fused kernels do it in one pass over every tensor of a param group, with
the gradient unscale of mixed-precision training folded in, instead of the several passes of
an unfused step.

Backends (dispatch rule in fastlm/_dispatch.py): ``cpu`` (C++ SIMD + OpenMP, csrc/cpu/adamw.cpp,
the kernel ZeRO-Offload runs on the host), ``cuda`` (csrc/cuda/adamw.cu, multi-tensor: many
tensors per launch), ``triton`` (triton_kernels/adamw.py, CUDA tensors) and ``torch`` (the
reference math, any device).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fastlm._build import load_extension
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
from fastlm._dtensor import is_dtensor, local

__all__ = ["FusedAdamW"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_op = define_op("adamw")


def _torch_step(params, grads, exp_avgs, exp_avg_sqs, masters, lr, beta1, beta2, eps, wd, step,
                inv_scale):
    """The reference: torch.optim.AdamW's operation order, in fp32."""
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        w = masters[i] if masters else p.float()
        g32 = g.float() * inv_scale if inv_scale != 1.0 else g.float()
        w.mul_(1 - lr * wd)
        m32 = m.float().lerp_(g32, 1 - beta1)
        v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = (v32.sqrt() / bc2_sqrt).add_(eps)
        w.addcdiv_(m32, denom, value=-lr / bc1)
        m.copy_(m32)
        v.copy_(v32)
        if w is not p:
            p.copy_(w)


class _TorchBackend:
    adamw_step_ = staticmethod(_torch_step)


_op.register(
    "cpu",
    all_of(needs_device("cpu"), needs_dtypes(torch.float32, *_LOW_PRECISION),
           extension_check("cpu", "adamw_step_")),
    lambda: load_extension("cpu"),
)
_op.register(
    "cuda",
    all_of(needs_device("cuda"), needs_dtypes(torch.float32, *_LOW_PRECISION),
           extension_check("cuda", "adamw_step_")),
    lambda: load_extension("cuda"),
)
_op.register(
    "triton",
    all_of(triton_check, needs_dtypes(torch.float32, *_LOW_PRECISION)),
    triton_launchers("fastlm.triton_kernels.adamw"),
)
_op.register("torch", lambda call: None, lambda: _TorchBackend)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with fused kernels.

    Same hyper-parameters, param groups and ``state_dict`` layout as ``torch.optim.AdamW``
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so either optimizer loads the
    other's state.

    Args:
        master_weights: keep an fp32 copy of bf16/fp16 parameters (state key ``master``),
            update it and write the rounded value back in the same pass. Default: on for
            bf16/fp16 parameters. Off means updating low-precision params in place (lossy).
        state_dtype: torch.float32 (default) or torch.bfloat16 moments: half the optimizer
            memory, at the cost of rounding m and v to 8 mantissa bits each step.
        backend: "cpu", "torch" or None/"auto" (then $FASTLM_BACKEND_ADAMW, $FASTLM_BACKEND).

    Works with ``torch.amp.GradScaler``: it reads ``grad_scale``/``found_inf`` set by the scaler,
    unscales inside the kernel and skips the step (state untouched) when gradients overflowed.
    :meth:`clip_grad_norm_` folds gradient clipping into the step the same way.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_weights: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        # torch.optim.AdamW's own switches, so code that passes them swaps in unchanged:
        # foreach/fused choose torch's implementation (this one is fused whatever they say);
        # the variants this step does not compute are refused rather than ignored
        for name, value in (("amsgrad", amsgrad), ("maximize", maximize),
                            ("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"FusedAdamW: {name}=True is not implemented; use "
                                 f"torch.optim.AdamW for it")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = float(lr)  # torch accepts a one-element tensor lr; the kernels take a number
        _check_hyper(lr, betas, eps, weight_decay)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FusedAdamW: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.backend = backend

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
        wants_master = self.master_weights if self.master_weights is not None else p.dtype in _LOW_PRECISION
        if wants_master and p.dtype in _LOW_PRECISION and "master" not in state:
            state["master"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's gradients, folded into the
        next :meth:`step`.

        The total norm is computed as torch computes it (one read of the gradients), but
        instead of rescaling every gradient in place (another read and a write: 8 of the 40
        bytes per parameter that clip + step move in fp32), the next ``step()`` multiplies
        each gradient by the clip coefficient as its kernel reads it. The gradients
        themselves stay unclipped; the update is the one torch's clip + AdamW make.
        Returns the total norm, like torch's.
        """
        if not math.isfinite(max_norm) or max_norm <= 0:
            raise ValueError(f"FusedAdamW.clip_grad_norm_: max_norm must be a positive "
                             f"finite number, got {max_norm}")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            self._clip_coef = None
            return torch.tensor(0.0)
        total = self._total_norm(grads, float(norm_type), error_if_nonfinite)
        whole = total.full_tensor() if is_dtensor(total) else total
        # torch's coefficient, same fp32 arithmetic: max_norm / (norm + 1e-6), at most 1
        self._clip_coef = torch.clamp(max_norm / (whole + 1e-6), max=1.0)
        return total

    def _total_norm(self, grads, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
        if any(is_dtensor(g) for g in grads):
            # sharded gradients: torch's norm reduces over the shards of every rank (a DTensor
            # result, as torch's clip returns); the coefficient needs the whole value
            return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        backend = _op.select(Call.of(grads[0]), self.backend)
        if backend.name != "cpu" or norm_type != 2.0 or any(
                not g.is_contiguous() or g.device.type != "cpu" for g in grads):
            return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        # the CPU kernel: one threaded pass at memory bandwidth, accumulated in double
        # (torch's CPU norm runs at about half the bandwidth here); fp32 result
        total = backend.impl().total_norm(grads)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"FusedAdamW.clip_grad_norm_: the total gradient norm is {float(total)}, so it "
                f"cannot be clipped; pass error_if_nonfinite=False to clip anyway (the step "
                f"then makes the parameters non-finite)")
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip, self._clip_coef = getattr(self, "_clip_coef", None), None  # one step only
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            return loss  # overflowed gradients: skip, as torch's fused optimizers do
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        if clip is not None:
            inv_scale *= float(clip)
        for group in self.param_groups:
            self._step_group(group, inv_scale)
        return loss

    def _step_group(self, group: dict, inv_scale: float) -> None:
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        kinds = {p.device.type for p in params}
        if len(kinds) > 1:  # several GPUs are fine (a model spread by device_map): see below
            raise ValueError(
                f"FusedAdamW: a param group mixes devices "
                f"{sorted({str(p.device) for p in params})}; put parameters of different "
                f"devices in separate groups (or optimizers)"
            )
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("FusedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
        states = [self._init_state(p) for p in params]
        # the step counters (scalar tensors, torch's state format) advanced in one call and
        # read in one: a `+= 1` and an int() per tensor cost more than a tiny model's update
        counters = [st["step"] for st in states]  # CPU float32 (load_state_dict sees to it)
        torch._foreach_add_(counters, 1.0)
        counts = torch.stack(counters).tolist()
        by_step: dict[tuple, list] = {}
        for p, st, count in zip(params, states, counts):
            # one launch per GPU: a group of a model spread over GPUs (device_map) raised
            key = (int(count), "master" in st, p.dtype, p.device)
            by_step.setdefault(key, []).append(p)
        beta1, beta2 = group["betas"]
        for (step, has_master, _dtype, _device), ps in by_step.items():
            # sharded parameters (FSDP2, tensor parallelism) are DTensors whose state is too
            # (torch's format, what distributed checkpoints save): the step is elementwise, so
            # each rank steps its own shards; a rank may hold none of a small tensor
            ps = [p for p in ps if local(p).numel() > 0]
            if not ps:
                continue
            backend = _op.select(Call.of(local(ps[0])), self.backend).impl()
            states = [self.state[p] for p in ps]
            backend.adamw_step_(
                [_contiguous(local(p)) for p in ps],
                [_contiguous(local(p.grad)) for p in ps],
                [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states],
                [local(s["master"]) for s in states] if has_master else [],
                float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), step, inv_scale,
            )

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype: for bf16/fp16
        # parameters that rounds the fp32 masters and moments to 8 bits of mantissa (a resumed
        # run would silently diverge). Keep those as saved, in the dtypes the step uses.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        kept = {}
        for pid, p in zip(saved_ids, params):
            st = state_dict["state"].get(pid, {})
            kept[p] = {k: st[k] for k in ("master", "exp_avg", "exp_avg_sq")
                       if torch.is_tensor(st.get(k))}
        super().load_state_dict(state_dict)
        for p, tensors in kept.items():
            for key, value in tensors.items():
                dtype = torch.float32 if key == "master" else self.state_dtype
                self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        # torch.optim.AdamW's state has no fp32 masters: rebuild them from the parameters.
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state = self.state[p]
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = state[key].to(self.state_dtype).contiguous()
                    # a fused or capturable torch AdamW keeps its counters on the device; the
                    # kernels take the step as a number, so they live on the host here
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32,
                                                    device="cpu").clone()
                    self._init_state(p)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(
            f"FusedAdamW needs contiguous parameters and gradients, got strides {t.stride()} "
            f"for shape {tuple(t.shape)}; call .contiguous() on the parameter data"
        )
    return t


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if not (isinstance(lr, float | int) and lr >= 0):
        raise ValueError(f"FusedAdamW: lr must be a number >= 0, got {lr!r}")
    if not eps >= 0:
        raise ValueError(f"FusedAdamW: eps must be >= 0, got {eps!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"FusedAdamW: betas must be two numbers in [0, 1), got {betas!r}")
    if not weight_decay >= 0:
        raise ValueError(f"FusedAdamW: weight_decay must be >= 0, got {weight_decay!r}")
