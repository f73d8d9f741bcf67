"""Direct preference optimisation (``train.objective: dpo``, Rafailov et al. 2023).

For a prompt with a chosen answer ``c`` and a rejected one ``r``, the loss is
``-log sigmoid(beta * ((log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r))))``, where
``log p`` sums the answer's token log-probabilities (the loss mask of ``fastlm prepare
--preference``) under the model being trained and ``p_ref`` under the model it started from.
The reference costs no second copy under LoRA: it is the same model with its adapters off.
Without LoRA it is a frozen copy of the starting weights (refused under ZeRO-3, which would have
to partition it too: use ``model.lora`` there).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from fastlm.data.loader import IGNORE_INDEX, Batch
from fastlm.train.config import ConfigError, RunConfig


class DpoObjective:
    def __init__(self, beta: float, reference: torch.nn.Module | None, kind: str = "sigmoid",
                 label_smoothing: float = 0.0):
        self.beta, self.kind, self.label_smoothing = beta, kind, label_smoothing
        self.reference = reference  # None: the trained model with its LoRA adapters off

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean DPO loss, fraction of pairs whose implicit reward ranks chosen first)."""
        policy = sequence_logps(engine, batch)
        with torch.no_grad():
            if self.reference is None:
                with adapters_off(engine.module):
                    ref = sequence_logps(engine.module, batch)
            else:
                ref = sequence_logps(self.reference, batch)
        return dpo_loss(policy, ref, self.beta, self.kind, self.label_smoothing)


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Sequence log-probs of 2B rows (B chosen, then B rejected) -> (loss, reward accuracy).
    ``sigmoid``: -log sigmoid(beta h), with ``label_smoothing`` e the conservative form
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); ``ipo``: (h - 1 / (2 beta))^2, where
    h is the chosen answer's log-ratio minus the rejected one's."""
    b = policy.shape[0] // 2
    h = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
    if kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) \
            - label_smoothing * F.logsigmoid(-beta * h)
    return loss.mean(), (h > 0).float().mean()


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """Each row's summed log-probability of its scored targets (the answer), fp32."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(batch.targets.shape).sum(-1)  # ignored targets add 0


@contextlib.contextmanager
def adapters_off(model):
    """The model as it was before its LoRA adapters trained (PEFT's per-layer switch, without
    the requires_grad changes of its public toggle: the engine keeps its parameters as set)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield model
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


def objective(cfg: RunConfig, model, dev) -> DpoObjective:
    """The DPO objective of a run; call before the engine is built (the reference copy is of
    the starting weights)."""
    if cfg.model.lora is not None:
        return DpoObjective(cfg.train.dpo_beta, None, cfg.train.dpo_loss,
                            cfg.train.dpo_label_smoothing)
    if cfg.train.zero_stage == 3:
        raise ConfigError("train.objective=dpo without model.lora keeps a whole frozen copy of "
                          "the model as its reference, which ZeRO-3 would have to partition "
                          "too: use model.lora (the reference is then the model with its "
                          "adapters off) or train.zero_stage <= 2")
    reference = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    if cfg.train.precision in ("bf16", "fp16"):
        from fastlm.train.model import to_dtype

        to_dtype(reference, torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)
    return DpoObjective(cfg.train.dpo_beta, reference, cfg.train.dpo_loss,
                        cfg.train.dpo_label_smoothing)
