"""``fastlm eval MODEL PAIRS``: how a model ranks the answers of held-out preference pairs.

PAIRS is a directory prepared with ``fastlm prepare --preference`` (each pair a chosen and a
rejected answer after the same prompt). Every pair of the split is read once, in its stored
order. For each, the model's summed log-probability of each answer (the answer's tokens alone,
as the DPO trainer computes it) gives:

- ``pref_acc``: the pairs whose chosen answer the model finds likelier (summed log-probability),
  and ``pref_acc_norm`` the same per answer token (longer answers are not penalised);
- with ``--reference REF`` (the model the preference tuning started from): DPO's implicit reward
  beta * (log p(c) / p_ref(c) - log p(r) / p_ref(r)), reported as ``reward_acc`` (the pairs it
  ranks right), ``reward_margin`` (its mean) and ``dpo_loss`` (the DPO loss at ``--beta``): what
  the trainer logs as ``val_reward_acc``/``val_reward_margin``/``val_loss`` on its validation
  split, for any model and split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlm.data.loader import IGNORE_INDEX


@dataclass
class PairResult:
    pairs: int
    pref_acc: float
    pref_acc_norm: float
    logp_chosen: float  # mean summed log-probability of the chosen answers
    logp_rejected: float
    reward_acc: float | None = None
    reward_margin: float | None = None
    dpo_loss: float | None = None
    beta: float | None = None


@torch.no_grad()
def evaluate_pairs(model, loader, *, reference=None, beta: float = 0.1, batch_size: int = 8,
                   fused: bool = True, device=None, progress: bool = True) -> PairResult:
    """Every pair of ``loader`` (a PairLoader) once; see the module docstring."""
    from tqdm import tqdm

    from fastlm.train.dpo import dpo_loss, sequence_logps
    from fastlm.train.model import eval_mode

    device = device or next(model.parameters()).device
    sums = {"pref": 0.0, "norm": 0.0, "chosen": 0.0, "rejected": 0.0, "reward": 0.0,
            "margin": 0.0, "loss": 0.0}
    with eval_mode(model, reference):
        for first in tqdm(range(0, loader.pairs, batch_size), desc="pairs", unit="batch",
                          disable=not progress):
            pairs = list(range(first, min(first + batch_size, loader.pairs)))
            batch = loader.batch_of(pairs).to(device)
            b = len(pairs)
            logps = sequence_logps(model, batch, fused).double()
            counts = (batch.targets != IGNORE_INDEX).sum(-1).double().clamp(min=1)
            mean = logps / counts
            sums["pref"] += float((logps[:b] > logps[b:]).sum())
            sums["norm"] += float((mean[:b] > mean[b:]).sum())
            sums["chosen"] += float(logps[:b].sum())
            sums["rejected"] += float(logps[b:].sum())
            if reference is not None:
                ref = sequence_logps(reference, batch, fused).double()
                loss, acc, margin = dpo_loss(logps, ref, beta)
                sums["reward"] += float(acc) * b
                sums["margin"] += float(margin) * b
                sums["loss"] += float(loss) * b
    n = loader.pairs
    result = PairResult(pairs=n, pref_acc=sums["pref"] / n, pref_acc_norm=sums["norm"] / n,
                        logp_chosen=sums["chosen"] / n, logp_rejected=sums["rejected"] / n)
    if reference is not None:
        result.reward_acc, result.reward_margin = sums["reward"] / n, sums["margin"] / n
        result.dpo_loss, result.beta = sums["loss"] / n, beta
    return result


def describe(result: PairResult) -> str:
    text = (f"{result.pairs} pairs: the chosen answer likelier in {result.pref_acc:.4f} "
            f"(per token {result.pref_acc_norm:.4f}); mean log-probability chosen "
            f"{result.logp_chosen:.2f}, rejected {result.logp_rejected:.2f}")
    if result.reward_acc is not None:
        text += (f"; against the reference: reward accuracy {result.reward_acc:.4f}, margin "
                 f"{result.reward_margin:.4f}, DPO loss {result.dpo_loss:.4f} (beta "
                 f"{result.beta:g}; {math.log(2):.4f} where the model is the reference)")
    return text
