"""The fused linear cross-entropy for ``fastlm.patch``: the LM head's loss without the
(tokens x vocab) logits, in training, for causal LMs whose forward is
``logits = lm_head(hidden)`` then ``loss = self.loss_function(logits, labels, ...)``.

Three per-instance pieces, nothing global:
- the model's forward, while training with labels, marks the head "deferred" for the call and
  returns ``logits=None`` (as Liger-Kernel does: the logits are what is saved);
- the deferred head returns its input (the hidden states) instead of logits;
- the instance's ``loss_function`` receives those hidden states and calls the head module
  again with the shifted labels, and the head computes the fused loss. Computing it *inside
  the head module's call* is what makes DeepSpeed ZeRO-3 work: its hooks gather the head's
  partitioned weight around that call (and the gradients are computed in the forward).
Outside training, without labels, or with ``logits_to_keep``, HF's own path runs unchanged.

Masked LMs (BERT) compute their loss inline, not through ``loss_function``: there the model's
forward runs with the decoder deferred and without labels (so it returns the transformed hidden
states as "logits" and no loss), then calls the decoder on the labelled positions only: MLM
labels ~15% of tokens, so the vocab-wide head runs on those alone.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch

from fastlm._dtensor import is_dtensor
from fastlm.integrations._forward import install_forward
from fastlm.ops import fused_linear_cross_entropy

_logger = logging.getLogger("fastlm")

# Causal LMs whose forward was read to be head(hidden) -> loss_function with nothing between
# (the mixtures of experts add their router loss after it).
LOSS_MODEL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox",
                    "opt", "phi", "gptj", "falcon", "stablelm", "starcoder2", "olmo", "olmo2",
                    "glm", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"}
# ... and those whose one step in between multiplies the logits by a constant (Granite divides
# by config.logits_scaling, Cohere multiplies by its logit_scale). The deferred head hands HF's
# forward the hidden states, which it scales instead; with no bias in the head that is the same
# product, (c h) W^T = c (h W^T), so the fused loss sees the scaled logits.
SCALED_MODEL_TYPES = {"granite": lambda model: 1.0 / model.config.logits_scaling,
                      "cohere": lambda model: model.logit_scale}
# ... and those whose one step in between is soft-capping by config.final_logit_softcapping
# (cap * tanh(logits / cap)), which the fused loss computes itself: the patched forward runs
# HF's with the setting off and hands the cap to the kernel (Gemma's 256k vocabulary is where
# never materialising the logits saves the most).
SOFTCAP_MODEL_TYPES = {"gemma2", "gemma3_text"}


# Masked LMs whose forward was read to be cls(sequence_output) -> CrossEntropyLoss(logits,
# labels) with the head's last step an nn.Linear at cls.predictions.decoder. By class: the
# same head in BertLMHeadModel computes a shifted causal loss, and BertForPreTraining adds
# next-sentence prediction.
MLM_MODEL_TYPES = {"bert"}
MLM_CLASSES = {"BertForMaskedLM"}


def mlm_head(model) -> torch.nn.Linear | None:
    """The decoder of a BERT-style masked-LM head, or None."""
    if getattr(getattr(model, "config", None), "model_type", None) not in MLM_MODEL_TYPES:
        return None
    if type(model).__name__ not in MLM_CLASSES:
        return None
    head = getattr(getattr(getattr(model, "cls", None), "predictions", None), "decoder", None)
    return head if isinstance(head, torch.nn.Linear) else None


def loss_unsupported(model) -> str | None:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype in MLM_MODEL_TYPES:
        if type(model).__name__ not in MLM_CLASSES:
            return (f"{type(model).__name__}'s loss was not read (of {mtype}'s heads only "
                    f"{', '.join(sorted(MLM_CLASSES))}'s is fused)")
        return None if mlm_head(model) is not None else (
            f"{type(model).__name__} has no masked-LM head (cls.predictions.decoder)")
    if mtype not in LOSS_MODEL_TYPES | SOFTCAP_MODEL_TYPES | set(SCALED_MODEL_TYPES):
        return f"model type {mtype!r} is not one whose LM-head path was verified"
    if getattr(cfg, "final_logit_softcapping", None) and mtype not in SOFTCAP_MODEL_TYPES:
        return "final-logit soft-capping sits between the head and the loss in HF's forward"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "no nn.Linear output embedding"
    if mtype in SCALED_MODEL_TYPES and head.bias is not None:
        return "its logits are scaled after a head with a bias (the scale would miss the bias)"
    return None


def fusable_head(model) -> bool:
    """Whether :func:`head_loss` can run on the model's final hidden states here: its
    head-to-loss path is known, and the head's weight is whole (not a ZeRO-3 partition) or is
    gathered by the call of its head module, patched by fastlm.patch."""
    if loss_unsupported(model) is not None:
        return False
    head = model.get_output_embeddings()
    return not hasattr(head.weight, "ds_id") or bool(head.__dict__.get("_fastlm_patched"))


def logit_scale(model) -> float:
    """The constant HF's forward multiplies the logits by before the loss (1 for most)."""
    scale = SCALED_MODEL_TYPES.get(getattr(model.config, "model_type", None))
    return 1.0 if scale is None else float(scale(model))


def head_loss(model, hidden: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
              reduction: str = "mean") -> torch.Tensor:
    """The model's LM head + cross-entropy on its final hidden states (B, T, H), fused: the
    head's output scaled and soft-capped as the model's forward does before its loss (for a
    model :func:`loss_unsupported` accepts), the (tokens x vocab) logits never materialised."""
    head = model.get_output_embeddings()
    scale = logit_scale(model)  # Granite's and Cohere's constant (no head bias there)
    if scale != 1.0:
        hidden = hidden * scale
    softcap = getattr(model.config, "final_logit_softcapping", None) or 0.0
    if head.__dict__.get("_fastlm_patched"):
        # inside the head module's call, where ZeRO-3 gathers its partitioned weight (and
        # gathers it again for the backward of reduction="none", which reads it)
        return head(hidden, labels=targets, ignore_index=ignore_index, reduction=reduction,
                    softcap=softcap)
    return fused_linear_cross_entropy(hidden, head.weight, targets, getattr(head, "bias", None),
                                      ignore_index=ignore_index, softcap=softcap,
                                      reduction=reduction)


def head_forward(self, x, labels=None, num_items_in_batch=None, ignore_index=-100,
                 reduction=None, softcap=None):
    if labels is not None:
        if softcap is None:  # set for the call by the patched model's forward (Gemma 2/3)
            softcap = self.__dict__.get("_fastlm_softcap") or 0.0
        if reduction is None:
            reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_linear_cross_entropy(
            x, self.weight, labels, self.bias, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss
    if self.__dict__.get("_fastlm_defer"):
        return x
    return torch.nn.functional.linear(x, self.weight, self.bias)


def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None,
                  ignore_index=-100, shift_labels=None, **kwargs):
    """The instance's ``loss_function`` (bound to the model): the fused loss for deferred
    calls, else the model's own. Everything is looked up on ``self`` at call time, so a
    ``copy.deepcopy`` of the model runs on the copy's head, not the original's."""
    head = self.get_output_embeddings()
    if not head.__dict__.get("_fastlm_defer"):
        return self.__dict__["_fastlm_loss_original"](
            logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    hidden = logits  # the deferred head returned the hidden states
    if shift_labels is None:
        hidden, shift_labels = hidden[..., :-1, :], labels[..., 1:]
    head.__dict__["_fastlm_defer"] = False  # the next call computes the loss
    return head(hidden, labels=shift_labels.to(hidden.device),
                num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)


def set_head_forward(handle, head) -> None:
    install_forward(head, head_forward)
    if handle is not None:
        handle._modules.append(head)


def _fused_head(model):
    """The model's output embedding with the fused forward, or None (HF's path then runs).

    A head replaced after the patch (``resize_token_embeddings`` builds a new Linear for an
    untied head) gets the fused forward on first use, and ``undo()`` removes it too."""
    head = model.get_output_embeddings()
    if _tensor_parallel(head):
        _warn_once(f"{type(model).__name__}'s output embedding is tensor-parallel (a DTensor "
                   f"weight split over the ranks): the fused loss needs each rank's whole "
                   f"vocabulary, so the model's own head and loss run")
        return None
    if head.__dict__.get("_fastlm_patched"):
        return head
    if not isinstance(head, torch.nn.Linear):
        _warn_once(f"{type(model).__name__}'s output embedding was replaced by a "
                   f"{type(head).__name__} after fastlm.patch: its loss runs unfused")
        return None
    set_head_forward(model.__dict__.get("_fastlm_patch"), head)
    _warn_once(f"{type(model).__name__}'s output embedding was replaced after fastlm.patch "
               "(resize_token_embeddings?): the fused loss now runs on the new one", info=True)
    return head


def _tensor_parallel(head) -> bool:
    """Whether ``head``'s weight is split by tensor parallelism (transformers' ``tp_plan``):
    a DTensor when the forward starts. FSDP2's are DTensors too between steps, but its hooks
    gather them for the forward (the root's before the model's forward runs, a head sharded
    on its own in the head's own call, where the fused loss reads it)."""
    if not is_dtensor(getattr(head, "weight", None)):
        return False  # (no import on this path: it runs every training forward)
    from torch.distributed.fsdp import FSDPModule

    return not isinstance(head, FSDPModule)


_warned: set[str] = set()


def _warn_once(message: str, info: bool = False) -> None:
    if message not in _warned:
        _warned.add(message)
        (_logger.info if info else _logger.warning)(message)


def model_forward(model):
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        fused = (self.training and kwargs.get("labels") is not None
                 and not kwargs.get("logits_to_keep"))
        head = _fused_head(self) if fused else None
        if head is None:
            return cls_forward(self, *args, **kwargs)
        cfg = self.config
        cap = (getattr(cfg, "final_logit_softcapping", None)
               if getattr(cfg, "model_type", None) in SOFTCAP_MODEL_TYPES else None)
        head.__dict__["_fastlm_defer"] = True
        if cap:  # HF's forward would soft-cap the deferred hidden states: the kernel does it.
            # This instance reads a copy of its config without the cap for the call; the
            # config object itself (maybe shared with other models) is not touched.
            head.__dict__["_fastlm_softcap"] = float(cap)
            uncapped = copy.copy(cfg)
            uncapped.final_logit_softcapping = None
            self.config = uncapped
        try:
            out = cls_forward(self, *args, **kwargs)
        finally:
            deferred = head.__dict__.pop("_fastlm_defer", False)
            if cap:
                self.config = cfg
                head.__dict__.pop("_fastlm_softcap", None)
        if deferred:  # the forward never reached loss_function: its result would be wrong
            raise RuntimeError(
                f"fastlm.patch(loss=True): {type(self).__name__}.forward did not pass the head's "
                "output to self.loss_function; patch this model with loss=False")
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...)
            return out[:1] + (None,) + out[2:]
        # a new output without logits (setting the field to None would leave it in the
        # mapping, which is what DeepSpeed's output hooks rebuild the object from)
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})

    return forward


def mlm_forward(model):
    """The masked-LM model's forward: in training with labels, the fused loss over the
    labelled positions (mean over them, as HF's CrossEntropyLoss with ignore_index -100)."""
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        head = mlm_head(self) if self.training and labels is not None else None
        if head is None or not head.__dict__.get("_fastlm_patched"):
            return cls_forward(self, *args, **kwargs)
        head.__dict__["_fastlm_defer"] = True
        try:
            out = cls_forward(self, *args, **dict(kwargs, labels=None))
        finally:
            head.__dict__.pop("_fastlm_defer", None)
        tuple_out = isinstance(out, tuple)
        hidden = out[0] if tuple_out else out.logits
        if hidden is None or hidden.shape[-1] != head.in_features or \
                hidden.shape[:-1] != labels.shape:
            raise RuntimeError(
                f"fastlm.patch(loss=True): {type(self).__name__}.forward did not return its "
                "masked-LM head's output as logits; patch this model with loss=False")
        flat = labels.reshape(-1).to(hidden.device)
        keep = flat != -100
        loss = head(hidden.reshape(-1, hidden.shape[-1])[keep], labels=flat[keep])
        if tuple_out:  # return_dict=False: (loss, logits, ...)
            return (loss, None) + out[1:]
        return type(out)(**{k: v for k, v in out.items() if k != "logits"}, loss=loss)

    return forward
