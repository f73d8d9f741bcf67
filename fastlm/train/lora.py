"""LoRA fine-tuning in the trainer (``model.lora``), with PEFT's layers injected in place.

The model stays the transformers class it was (``peft.inject_adapter_in_model``, not a
``PeftModel`` wrapper), so fastlm's attention, ``fastlm.patch``, the fused LM-head loss, ZeRO
and the checkpoints see the model they always see, its adapters as more parameters. Only the
adapters train (and the embeddings when the data's vocabulary grew them: new rows cannot stay
random). ``fastlm export`` merges the adapters into the weights, so the exported directory is a
plain Hugging Face model.
"""

from __future__ import annotations

import copy
import warnings

import torch

from fastlm.train.config import ConfigError, LoraSettings


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("model.lora needs the peft package: pip install 'fastlm[lora]' "
                          "(or pip install peft), or drop model.lora to train every weight"
                          ) from exc
    # PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecates: a FutureWarning
    # at every adapter load that no fastlm user can act on
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message="`is_gradient_checkpointing` is deprecated")
    return peft


def apply_lora(model, spec: LoraSettings, *, train_embeddings: bool = False):
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns it."""
    peft = _peft()
    target = spec.target_modules
    conf = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=target, use_rslora=spec.rslora, bias="none")
    try:
        peft.inject_adapter_in_model(conf, model)
    except ValueError as exc:  # no module matched target_modules
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"model.lora.target_modules={target!r}: {exc} (this model's linear "
                          f"layers: {names}; or 'all-linear')") from exc
    head = model.get_output_embeddings()
    if _is_lora(head):
        # the fused loss reads the head's weight directly and would train past the adapter
        raise ConfigError(f"model.lora.target_modules={target!r} adapts the LM head; leave it "
                          f"out (its weight is read by the fused loss)")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if train_embeddings:
        for emb in (model.get_input_embeddings(), head):
            if emb is not None:
                emb.weight.requires_grad_(True)
    return model


def summary(model, spec: LoraSettings) -> str:
    """One line for the run's log: what trains."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapted = sum(_is_lora(m) for m in model.modules())
    embeddings = model.get_input_embeddings().weight.requires_grad
    return (f"model.lora: {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.2f}%): rank {spec.r} adapters on {adapted} layers "
            f"({spec.target_modules})" + ("; the embeddings too (the data's vocabulary grew them)"
                                          if embeddings else ""))


def adapter_files(model, base: str) -> tuple[dict, object]:
    """(tensors, LoraConfig) of ``model``'s adapters in PEFT's saved layout, which
    ``PeftModel.from_pretrained(base, DIR)`` and transformers' ``load_adapter(DIR)`` read."""
    peft = _peft()
    if model.get_input_embeddings().weight.requires_grad:
        raise ConfigError("--adapter: the run trained the embeddings too (the data's vocabulary "
                          "grew them), which adapters alone do not carry; export the merged "
                          "model (without --adapter)")
    conf = copy.deepcopy(model.peft_config["default"])  # as injected (GPT-2: fan_in_fan_out)
    conf.base_model_name_or_path = base
    conf.task_type = "CAUSAL_LM"
    conf.inference_mode = True
    tensors = peft.get_peft_model_state_dict(model, adapter_name="default")
    # PeftModel's own names: its wrapper (base_model) around a LoraModel (model)
    return {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, conf


def merge_lora(model):
    """Fold every adapter into its layer's weight and put the plain layer back (in place)."""
    for name, module in list(model.named_modules()):
        if not _is_lora(module):
            continue
        module.merge(safe_merge=True)  # refuses NaN/inf rather than writing them
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def _is_lora(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)
