"""Direct preference optimisation (``train.objective: dpo``, Rafailov et al. 2023).

For a prompt with a chosen answer ``c`` and a rejected one ``r``, the loss is
``-log sigmoid(beta * ((log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r))))``, where
``log p`` sums the answer's token log-probabilities (the loss mask of ``fastlm prepare
--preference``) under the model being trained and ``p_ref`` under the model it started from.
The reference costs no second copy under LoRA: it is the same model with its adapters off.
Without LoRA it is a frozen copy of the starting weights (refused under ZeRO-3, which would have
to partition it too: use ``model.lora`` there).

``train.dpo_loss`` picks the loss on the pair's log-probabilities: ``sigmoid`` (DPO), ``ipo``
(Azar et al. 2023), and two without a reference model (no reference forward, no copy, any ZeRO
stage), both on the answers' mean log-probability per token: ``simpo`` (Meng et al. 2024),
``-log sigmoid(beta (mean log p(c) - mean log p(r)) - gamma)`` with the target margin
``train.simpo_gamma``, and ``orpo`` (Hong et al. 2024), the chosen answer's mean token loss plus
``beta`` times ``-log sigmoid`` of the log odds ratio of the two answers' mean probabilities.
``train.dpo_nll_weight`` adds the chosen answers' mean token loss at that weight to the others
(RPO, Pang et al. 2024; Llama 3's DPO kept it too): the chosen answers' likelihood then does
not fall while the margin grows.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from fastlm.data.loader import IGNORE_INDEX, Batch
from fastlm.train.config import ConfigError, RunConfig

# losses on the policy's log-probabilities alone
REFERENCE_FREE = ("simpo", "orpo")
# what a step logs beside the loss, as TRL's trainers do: the pairs whose implicit reward ranks
# the chosen answer first, the mean reward margin (beta h, h as in dpo_loss), and the mean
# summed log-probability of the chosen and of the rejected answers (both falling while the
# margin grows is DPO's known drift, which these make visible)
STATS = ("reward_acc", "reward_margin", "logp_chosen", "logp_rejected")


class DpoObjective:
    def __init__(self, beta: float, reference: torch.nn.Module | None, kind: str = "sigmoid",
                 label_smoothing: float = 0.0, gamma: float = 0.5, nll_weight: float = 0.0):
        self.beta, self.kind, self.label_smoothing = beta, kind, label_smoothing
        self.gamma, self.nll_weight = gamma, nll_weight
        # None: the trained model with its LoRA adapters off (no reference at all for the
        # reference-free losses)
        self.reference = reference

    def loss(self, engine, batch: Batch, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, the :data:`STATS` as a detached tensor); ``fused``: the LM head and the
        log-probabilities chunked, never the full logits."""
        ref = None
        if batch.ref_logps is not None:  # precomputed at the start of the run
            ref = batch.ref_logps.to(torch.float32)
        elif self.kind not in REFERENCE_FREE:
            with torch.no_grad():  # first: its activations are freed before the policy's
                if self.reference is None:
                    with adapters_off(engine.module):
                        ref = sequence_logps(engine.module, batch, fused)
                else:
                    ref = sequence_logps(self.reference, batch, fused)
        policy = sequence_logps(engine, batch, fused)
        counts = (batch.targets != IGNORE_INDEX).sum(-1)
        loss, acc, margin = dpo_loss(policy, ref, self.beta, self.kind, self.label_smoothing,
                                     counts=counts, gamma=self.gamma)
        b = policy.shape[0] // 2
        if self.nll_weight:  # RPO: the chosen answers' mean token loss too
            loss = loss - self.nll_weight * (policy[:b] / counts[:b].clamp(min=1)).mean()
        logps = policy.detach()
        return loss, torch.stack([acc, margin, logps[:b].mean(), logps[b:].mean()])


def row_lengths(batch: Batch) -> torch.Tensor:
    """Each row's real tokens: rows end with their answer (right-padded after it), so a row
    runs to its last scored target."""
    scored = batch.targets != IGNORE_INDEX
    width = scored.shape[1]
    last = width - scored.flip(1).int().argmax(1)
    return torch.where(scored.any(1), last, torch.zeros_like(last))


class PairFlops:
    """The FLOPs of a DPO micro-batch as MFU counts them (fastlm.train.model.flops_per_token):
    the policy's forward and backward and, for the losses with a reference, its forward, each
    row at its own length (the attention's part grows with it; padding is not counted)."""

    def __init__(self, model, with_reference: bool):
        self.model, self.with_reference = model, with_reference
        self._by_length: dict[int, float] = {}

    def of(self, lengths: list[int]) -> float:
        from fastlm.train.model import flops_per_token

        total = 0.0
        for n in lengths:
            if n not in self._by_length:
                per = flops_per_token(self.model, n)
                if self.with_reference:
                    per += flops_per_token(self.model, n, forward_only=True)
                self._by_length[n] = per * n
            total += self._by_length[n]
        return total


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor | None, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0, *, counts: torch.Tensor | None = None,
             gamma: float = 0.5):
    """Sequence log-probs of 2B rows (B chosen, then B rejected) -> (loss, reward accuracy,
    reward margin), the last two detached.

    With h the chosen answer's log-ratio (policy over ``ref``) minus the rejected one's:
    ``sigmoid``: -log sigmoid(beta h), with ``label_smoothing`` e the conservative form
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); ``ipo``: (h - 1 / (2 beta))^2.
    Reference-free, on the mean log-probability per answer token (``counts`` tokens a row):
    ``simpo``: as sigmoid, of beta h - ``gamma`` with h the chosen mean minus the rejected
    one; ``orpo``: the chosen answer's mean token loss - beta log sigmoid(h), h the log odds
    ratio log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)) of the mean probabilities p = exp(mean).
    The accuracy counts the pairs with h > 0; the margin is the mean of beta h."""
    b = policy.shape[0] // 2

    def smoothed_sigmoid(z):
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)

    if kind in REFERENCE_FREE:
        mean = policy / counts.to(policy.dtype).clamp(min=1)
        if kind == "simpo":
            h = mean[:b] - mean[b:]
            loss = smoothed_sigmoid(beta * h - gamma)
        else:
            # log(p / (1 - p)) = mean - log(1 - exp(mean)); a mean of exactly 0 (p = 1) would
            # give an infinite odds: held just below
            mean = mean.clamp(max=-1e-6)
            log_odds = mean - torch.log(-torch.expm1(mean))
            h = log_odds[:b] - log_odds[b:]
            loss = -mean[:b] - beta * F.logsigmoid(h)
    else:
        h = (policy[:b] - ref[:b]) - (policy[b:] - ref[b:])
        loss = (h - 1 / (2 * beta)) ** 2 if kind == "ipo" else smoothed_sigmoid(beta * h)
    h = h.detach()
    return loss.mean(), (h > 0).float().mean(), beta * h.mean()


def sequence_logps(model, batch: Batch, fused: bool = False) -> torch.Tensor:
    """Each row's summed log-probability of its scored targets (the answer), fp32.

    ``fused`` (a model whose head-to-loss path :func:`loss_unsupported` accepts): the model stops
    at its final hidden states and the LM head runs in chunks with the per-token losses
    (fastlm's fused linear cross-entropy, reduction="none"), so neither the forward nor the
    saved activations hold (2 x pairs x tokens x vocab) fp32 logits: with a 128k vocabulary,
    4 pairs of 2048 tokens, that was 8 GB."""
    if fused:
        from fastlm.integrations._patch_loss import head_loss

        out = model(input_ids=batch.input_ids, use_cache=False, output_hidden_states=True,
                    logits_to_keep=1)
        nll = head_loss(getattr(model, "module", model), out.hidden_states[-1], batch.targets,
                        ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.sum(-1)
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


def needs_reference_copy(cfg: RunConfig) -> bool:
    """Whether the run keeps a frozen copy of its starting weights as DPO's reference (a loss
    with a reference, without LoRA); under ZeRO-3 that is refused with the alternatives."""
    t = cfg.train
    if (t.objective != "dpo" or cfg.model.lora is not None or t.dpo_loss in REFERENCE_FREE
            or t.dpo_precompute_reference):
        return False
    if t.zero_stage == 3:
        raise ConfigError("train.objective=dpo without model.lora keeps a whole frozen copy of "
                          "the model as its reference, which ZeRO-3 would have to partition "
                          "too: use model.lora (the reference is then the model with its "
                          "adapters off), train.dpo_precompute_reference=true (its "
                          "log-probabilities computed once at the start), a loss without a "
                          "reference (train.dpo_loss=simpo or orpo) or train.zero_stage <= 2")
    return True


def objective(cfg: RunConfig, model, dev) -> DpoObjective:
    """The DPO objective of a run; call before the engine is built (the reference copy is of
    the starting weights)."""
    t = cfg.train
    settings = dict(kind=t.dpo_loss, label_smoothing=t.dpo_label_smoothing,
                    gamma=t.simpo_gamma, nll_weight=t.dpo_nll_weight)
    if not needs_reference_copy(cfg):
        return DpoObjective(t.dpo_beta, None, **settings)
    reference = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    if t.precision in ("bf16", "fp16"):
        from fastlm.train.model import to_dtype

        to_dtype(reference, torch.bfloat16 if t.precision == "bf16" else torch.float16)
    return DpoObjective(t.dpo_beta, reference, **settings)


@torch.no_grad()
def reference_logps(engine, loader, batch_size: int, rank: int, world: int, dev,
                    fused: bool = False, progress: bool = False) -> torch.Tensor:
    """(pairs, 2) float64: the summed log-probability of every pair's chosen and rejected
    answer under the model as it is now (a run's start: DPO's reference), LoRA's adapters off,
    in eval mode. The ranks share the pairs and sum their tables; each runs as many forwards
    (ZeRO-3 gathers the weights with every rank)."""
    from tqdm import tqdm

    from fastlm.train.model import eval_mode

    model = engine.module
    table = torch.zeros(loader.pairs, 2, dtype=torch.float64, device=dev)
    mine = list(range(rank, loader.pairs, world))
    per_rank = math.ceil(loader.pairs / world)
    batches = math.ceil(per_rank / batch_size)
    lora = any(".lora_" in n for n, _ in model.named_parameters())
    with eval_mode(model), adapters_off(model) if lora else contextlib.nullcontext():
        for i in tqdm(range(batches), desc="reference log-probs", unit="batch",
                      disable=not progress):
            ids = mine[i * batch_size:(i + 1) * batch_size]
            batch = loader.batch_of(ids or [0]).to(dev)  # [0]: a filler forward
            logps = sequence_logps(model, batch, fused).double()
            if ids:
                table[ids, 0], table[ids, 1] = logps[:len(ids)], logps[len(ids):]
    from fastlm.train import dist as fdist

    return fdist.all_sum(table).cpu()
