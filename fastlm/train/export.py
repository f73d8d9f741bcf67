"""``fastlm export CKPT OUT``: a training checkpoint -> a Hugging Face model directory.

ZeRO-sharded checkpoints (stages 1-3) are consolidated into fp32 weights with DeepSpeed's own
converter; stage 0 checkpoints hold the module's state dict directly (and, in bf16, FusedAdamW's
fp32 master weights, which are exported instead of the bf16 parameters). The directory is written
to a temporary sibling and renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastlm._fs import shareable
from fastlm.train import checkpoint as ckpt


class ExportError(Exception):
    user_facing = True


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, *, merge: bool = True):
    """(model, run config dict, run directory) from a run directory / checkpoint directory /
    tag directory. A LoRA run's adapters are folded into the weights, unless ``merge=False``."""
    from fastlm.train.config import model_config
    from fastlm.train.model import (
        hf_config,
        lm_class,
        pad_generation_with,
        record_trained_context,
    )

    try:
        ckpt_dir, tag = ckpt.resolve(path)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ExportError(str(exc)) from exc
    damage = ckpt.damaged_file(ckpt_dir, tag)
    if damage is not None:
        raise ExportError(f"the checkpoint {ckpt_dir / tag} is damaged: {damage}; restore its "
                          f"files, or name an earlier checkpoint of the run")
    state = ckpt.saved_state(ckpt_dir, tag)
    run = state["config"]
    mcfg = model_config(run["model"])
    conf = hf_config(mcfg, state["vocab_size"], run["data"]["block_size"], state["eos_id"])
    # transformers' default attention (SDPA where the model has it: Gemma 2 refuses it)
    model = lm_class(conf).from_config(conf, dtype=torch.float32)
    if not mcfg.pretrained:
        pad_generation_with(model, state["eos_id"])
    record_trained_context(model, run["data"]["block_size"], pretrained=bool(mcfg.pretrained))
    # a pretrained model's embeddings grown to the data's vocabulary (as build_model did)
    grew = state["vocab_size"] > model.get_input_embeddings().num_embeddings
    if grew:
        model.resize_token_embeddings(state["vocab_size"], mean_resizing=False)  # loaded next
    if mcfg.lora is not None:  # the trained layout (its names, what trained: see param_groups)
        from fastlm.train.lora import apply_lora

        apply_lora(model, mcfg.lora, train_embeddings=grew)
    weights = _consolidated_state_dict(ckpt_dir, tag, model, run)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied heads are stored once; anything else missing means a mismatched checkpoint.
    tie = getattr(conf, "tie_word_embeddings", False)
    tied = {k for k in missing if "lm_head" in k} if tie else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"{path}: checkpoint does not match the model "
                          f"(missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]})")
    if tie:
        model.tie_weights()
    if mcfg.lora is not None and merge:
        from fastlm.train.lora import merge_lora

        merge_lora(model)  # a plain transformers model: the adapters folded into its weights
    return model.to(dtype).eval(), run, ckpt_dir.parent


def _consolidated_state_dict(ckpt_dir: Path, tag: str, model, run: dict) -> dict:
    tag_dir = ckpt_dir / tag
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        if files:
            # frozen weights (LoRA's base) hold no optimizer partition; with bf16 + ZeRO 1/2
            # DeepSpeed records none of them either, but the model file holds them whole
            saved = torch.load(files[0], map_location="cpu", weights_only=False)
            for name, value in (saved.get("module") or {}).items():
                if name not in weights and torch.is_tensor(value) and value.numel():
                    weights[name] = value.float()
        return weights
    if not files:
        raise ExportError(f"{tag_dir}: no model states found; is this a fastlm checkpoint?")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    weights = {k: v.float() for k, v in saved["module"].items()}
    # bf16 without ZeRO: FusedAdamW held fp32 masters of the bf16 parameters; export those
    # (what ZeRO's converter gives for stages 1-3), not the parameters rounded to bf16
    masters = _optimizer_masters(saved.get("optimizer"), model, run)
    # a tied weight is saved under each of its names, as one tensor: every name gets the master
    where = {k: (v.data_ptr(), tuple(v.shape)) for k, v in saved["module"].items()}
    for name, master in masters.items():
        for alias, at in where.items():
            if at == where.get(name):
                weights[alias] = master
    return weights


def _optimizer_masters(opt, model, run: dict) -> dict:
    """{parameter name: fp32 master} from a stage-0 optimizer state that kept masters. Its
    parameters are numbered in the order of the trainer's groups (fastlm.train.model
    .param_groups), which the same model config rebuilds."""
    from fastlm.train.model import param_groups

    if not isinstance(opt, dict) or not any("master" in st for st in opt.get("state", {}).values()):
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, float(run.get("optim", {}).get("weight_decay", 0.0)))
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt["param_groups"]]:
        raise ExportError("the checkpoint's optimizer groups do not match the model's; is "
                          "this a fastlm checkpoint of this run's model?")
    masters = {}
    for group, saved in zip(groups, opt["param_groups"]):
        for p, pid in zip(group["params"], saved["params"]):
            master = opt["state"].get(pid, {}).get("master")
            if torch.is_tensor(master):
                if master.shape != p.shape:
                    raise ExportError(f"the checkpoint's master weight of {names[id(p)]} has "
                                      f"shape {tuple(master.shape)}, the model's {tuple(p.shape)}")
                masters[names[id(p)]] = master.float()
    return masters


def export(path: str | Path, out: str | Path, *, overwrite: bool = False,
           dtype: torch.dtype = torch.float32, adapter: bool = False) -> Path:
    """Write the checkpoint at ``path`` to ``out`` as a Hugging Face model directory, or with
    ``adapter`` (a LoRA run of a pretrained directory) as a PEFT adapter directory."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    model, run, run_dir = load_model(path, dtype, merge=not adapter)
    files = _adapter(model, run) if adapter else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if files is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            tensors, conf = files
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            conf.save_pretrained(str(tmp))
        tok = run_dir / "tokenizer"
        if not tok.is_dir():
            tok = Path(run["data"]["path"]) / "tokenizer"
        if tok.is_dir():
            from fastlm.data.tokenizer import tokenizer_files

            for f in tokenizer_files(tok):
                if not (tmp / f.name).exists():  # never over what the model wrote
                    shutil.copy2(f, tmp / f.name)
        shareable(tmp)  # mkdtemp's 0700 and transformers' 0600 weights: as mkdir would make
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _adapter(model, run: dict):
    from fastlm.train.lora import adapter_files

    lora, base = run["model"].get("lora"), run["model"].get("pretrained")
    if lora is None:
        raise ExportError("--adapter: this run trained every weight (no model.lora); export the "
                          "whole model without --adapter")
    if not base:
        raise ExportError(f"--adapter: this run's adapters sit on a model built from the preset "
                          f"{run['model'].get('preset')!r} (random weights no file holds); export "
                          f"the merged model without --adapter")
    return adapter_files(model, str(Path(base).resolve()))


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="run directory, checkpoints directory or checkpoint")
    parser.add_argument("out", help="output Hugging Face model directory")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run (model.lora) of a pretrained directory: write its "
                             "adapters alone as a PEFT adapter directory (default: the model "
                             "with the adapters merged into its weights)")


def run(args) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = export(args.checkpoint, args.out, overwrite=args.overwrite, dtype=dtype,
                 adapter=args.adapter)
    if args.adapter:
        print(f"exported the adapters of {args.checkpoint} -> {out} (load with "
              f"PeftModel.from_pretrained(base_model, {str(out)!r}), or base_model"
              f".load_adapter({str(out)!r}))")
        return 0
    from transformers import AutoConfig

    from fastlm.train.model import lm_class

    auto = lm_class(AutoConfig.from_pretrained(str(out))).__name__
    print(f"exported {args.checkpoint} -> {out} (load with {auto}.from_pretrained({str(out)!r}))")
    return 0
