"""Build the Hugging Face causal LM a run trains, and its optimizer parameter groups.

Every model is a standard transformers model, so every checkpoint is a standard checkpoint.
fastlm's kernels go in through the public drop-in (``attn_implementation="fastlm"`` and
``fastlm.patch``), the same API users call on their own models.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
import yaml

from fastlm.train.config import ConfigError, ModelConfig

logger = logging.getLogger("fastlm")

_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_dirs() -> list[Path]:
    """Where presets are looked up: the installed copy, then a source checkout's configs/."""
    dirs = []
    try:
        import fastlm._configs as packaged  # installed wheel: configs/ -> fastlm/_configs

        dirs.append(Path(next(iter(packaged.__path__))))
    except ImportError:
        pass
    dirs.append(_REPO_CONFIGS)
    return dirs


def preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in config_dirs():
        cand = d / "models" / f"{preset}.yaml"
        if cand.is_file():
            return cand
    known = sorted({q.stem for d in config_dirs() for q in (d / "models").glob("*.yaml")})
    raise ConfigError(f"model.preset {preset!r} not found; known presets: {known} "
                      f"(or give a path to a YAML file of HF config keys)")


def hf_config(cfg: ModelConfig, vocab_size: int | None, block_size: int | None,
              eos_id: int | None = None):
    """The transformers config: preset (or pretrained dir's) keys, then overrides, then what
    the data fixes (vocabulary size, and a context at least the block size)."""
    from transformers import AutoConfig

    if cfg.pretrained:
        if not Path(cfg.pretrained, "config.json").is_file():
            raise ConfigError(f"model.pretrained {cfg.pretrained!r} is not a Hugging Face model "
                              f"directory (no config.json); give a local directory")
        # transformers drops a keyword that is not an attribute of the loaded config, silently
        conf, unused = AutoConfig.from_pretrained(cfg.pretrained, return_unused_kwargs=True,
                                                  **cfg.overrides)
        if unused:
            _unknown_keys(sorted(unused), conf, "model.overrides")
        return conf
    preset = yaml.safe_load(preset_path(cfg.preset).read_text()) or {}
    keys = {**preset, **cfg.overrides}
    model_type = keys.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"model preset {cfg.preset!r} has no model_type")
    base = _default_config(model_type)
    if base is not None:
        _text_only(base, model_type, cfg)
    if vocab_size is not None:
        keys["vocab_size"] = vocab_size
    if eos_id is not None:  # the data's EOS is the model's BOS and EOS (GPT-2 convention)
        keys.update(bos_token_id=eos_id, eos_token_id=eos_id)
        # ... and its PAD only where the config has one: Llama's embedding takes
        # pad_token_id as its padding_idx, whose row starts at zero and gets no gradient, so
        # with PAD = EOS an untied model never learned its EOS input embedding. A type with
        # a default PAD (OPT's 1) would freeze that real token instead: EOS there.
        if base is not None and base.pad_token_id is not None:
            keys.setdefault("pad_token_id", eos_id)
    try:
        conf = AutoConfig.for_model(model_type, **keys)
    except ValueError as exc:  # an unknown model_type names the known ones
        raise ConfigError(f"model preset {cfg.preset!r}: {exc}") from exc
    _check_keys(conf, keys, cfg)
    ctx_key = "n_positions" if hasattr(conf, "n_positions") else "max_position_embeddings"
    if block_size is not None and getattr(conf, ctx_key, block_size) < block_size:
        setattr(conf, ctx_key, block_size)
    if block_size is not None and hasattr(conf, "max_position_embeddings"):
        _positions_after_pad(conf, block_size)
    return conf


def _positions_after_pad(conf, block_size: int) -> None:
    """RoBERTa's family and XGLM number positions from the PAD id on (PAD + 1, PAD + 2, ...),
    so their table needs PAD + block + 1 rows; with the data's EOS as PAD (256 for bytes) a
    preset's table was too short (an assertion at build, an IndexError in XGLM's forward).
    Found on a meta-device build with room enough: a position table whose padding_idx is
    PAD. The table grows as the trainer grows any preset's context to the block."""
    pad = getattr(conf, "pad_token_id", None)
    if not isinstance(pad, int) or conf.max_position_embeddings >= pad + block_size + 1:
        return
    probe = copy.deepcopy(conf)
    probe.max_position_embeddings = pad + block_size + 1
    try:
        with torch.device("meta"):
            model = lm_class(probe).from_config(probe)
    except Exception:  # noqa: BLE001 - not buildable so: the real build reports it
        return
    if any("position" in name and getattr(m, "padding_idx", None) == pad
           for name, m in model.named_modules()):
        logger.info("%s numbers positions from its PAD id %d: max_position_embeddings %d -> %d",
                    conf.model_type, pad, conf.max_position_embeddings, pad + block_size + 1)
        conf.max_position_embeddings = pad + block_size + 1


def _default_config(model_type: str):
    """The type's config with its defaults, or None for a type unknown or unbuildable so
    (the real build just after reports it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - reported by the build with the preset's keys
        return None


def _text_only(probe, model_type: str, cfg: ModelConfig) -> None:
    """A preset builds a language model from scratch: a composite type (Gemma 3's, Llama 4's:
    a vision tower + a language model) keeps the vocabulary and sizes in a sub-config, so the
    data's vocabulary size went nowhere (an error naming keys the user never wrote)."""
    key = text_sub_config(probe)
    if key is not None:
        text = getattr(probe, key)
        raise ConfigError(
            f"model preset {cfg.preset!r}: model_type {model_type!r} is a composite config "
            f"(a language model inside a vision-language or speech model); a preset builds the "
            f"language model alone: use model_type {text.model_type!r} (fine-tuning a "
            f"pretrained {model_type} directory goes through model.pretrained)")


def text_sub_config(conf) -> str | None:
    """The attribute holding a composite config's language model (Gemma 3's ``text_config``),
    or None for a config that is a language model itself: an encoder-decoder's (BART's) text
    config is a view of itself, not a sub-config, and BART builds as a causal LM."""
    text = conf.get_text_config(decoder=True)
    return next((k for k in getattr(conf, "sub_configs", {}) if getattr(conf, k, None) is text),
                None)


def _check_keys(conf, keys: dict, cfg: ModelConfig) -> None:
    """A key the config class does not know (``n_layers`` for GPT-2's ``n_layer``) is kept by
    transformers as a plain attribute that nothing reads: the model trains at its default
    size. A known key is a parameter of the class, an alias in its attribute map, or one it
    converts and does not keep (Llama's ``rope_theta`` goes into ``rope_parameters``)."""
    import inspect

    known = set(inspect.signature(type(conf).__init__).parameters)
    known |= set(getattr(conf, "attribute_map", {}))
    default = type(conf)()
    unknown = [k for k in keys if k not in known and hasattr(conf, k) and not hasattr(default, k)]
    if unknown:
        where = "model.overrides" if any(k in cfg.overrides for k in unknown) else \
            f"model preset {cfg.preset!r}"
        _unknown_keys(unknown, default, where)


def _unknown_keys(unknown: list, conf, where: str) -> None:
    import difflib

    names = sorted(set(conf.to_dict()) | set(getattr(conf, "attribute_map", {})))
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, names, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    verb = "is not a key" if len(hints) == 1 else "are not keys"
    raise ConfigError(f"{where}: {', '.join(hints)} {verb} of {type(conf).__name__} "
                      f"(model_type {conf.model_type!r}); transformers would ignore "
                      f"{'it' if len(hints) == 1 else 'them'}")


def build_model(cfg: ModelConfig, vocab_size: int | None, block_size: int | None,
                dtype: torch.dtype = torch.float32, eos_id: int | None = None):
    """A fresh model from the preset (seeded by the caller), or the pretrained weights."""
    _register_fastlm_attention(cfg)
    conf = hf_config(cfg, vocab_size, block_size, eos_id)
    auto = lm_class(conf)
    choices = _attn_choices(conf, cfg.attn_implementation)
    rng = torch.random.get_rng_state()  # a failed build drew from it: each try starts here
    for attn in choices:
        torch.random.set_rng_state(rng)
        try:
            if cfg.pretrained:
                model = auto.from_pretrained(cfg.pretrained, config=copy.deepcopy(conf),
                                             attn_implementation=attn, dtype=dtype)
            else:
                model = auto.from_config(copy.deepcopy(conf), attn_implementation=attn,
                                         dtype=dtype)
            break
        except KeyError as exc:  # see _attn_choices
            if exc.args != ("fastlm",) or attn is choices[-1]:
                raise
    if attn != cfg.attn_implementation:
        logger.warning(
            "model.attn_implementation=%s: part of %s picks its attention classes from a fixed "
            "table without registered implementations; fastlm's attention runs %s",
            cfg.attn_implementation, type(model).__name__,
            "in its language model only" if attn else "nowhere in it (transformers' default)")
    grew = cfg.pretrained and vocab_size is not None \
        and model.get_input_embeddings().num_embeddings < vocab_size
    if grew:
        model.resize_token_embeddings(vocab_size)
    if not cfg.pretrained:
        pad_generation_with(model, eos_id)
    record_trained_context(model, block_size, pretrained=bool(cfg.pretrained))
    if cfg.patch:
        _apply_patch(model)
    if cfg.lora is not None:
        from fastlm.train.lora import apply_lora

        apply_lora(model, cfg.lora, train_embeddings=bool(grew))
    return model


TRAINED_CONTEXT = "fastlm_trained_context"


def record_trained_context(model, block_size: int | None, *, pretrained: bool) -> None:
    """Note in the model's config the longest sequence it has been trained on: a preset's
    position table may be longer than the run's blocks (tiny-gpt2: 256 positions, blocks of
    64), and its positions past the block never train. `fastlm eval` scores in windows of it
    by default (in windows of the whole table a Shakespeare model scored 3.07 where its run
    said 1.79). A pretrained directory without the note was trained elsewhere, on its
    whole context: it gets none; with one (a fastlm run's export) the longer of the two."""
    if block_size is None:
        return
    earlier = getattr(model.config, TRAINED_CONTEXT, None)
    if earlier is None and pretrained:
        return
    setattr(model.config, TRAINED_CONTEXT, max(block_size, earlier or 0))


def pad_generation_with(model, eos_id: int | None) -> None:
    """Batched generation pads with EOS (the config's PAD stays unset, see hf_config); saved
    with the export's generation_config.json."""
    gen = getattr(model, "generation_config", None)
    if eos_id is not None and gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = eos_id


def _attn_choices(conf, impl: str) -> list:
    """attn_implementation values to build with, best first. A few models build their attention
    from a table of classes keyed by name (GIT's text model, SAM's vision tower inside
    DeepSeek-VL-Hybrid) and fail with KeyError('fastlm'): then fastlm's attention goes into the
    language model's sub-config alone, and failing that nowhere (announced)."""
    if impl != "fastlm":
        return [impl]
    choices = [impl]
    key = text_sub_config(conf)
    if key is not None:
        choices.append({key: impl})
    return choices + [None]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_tokenizer(pretrained: str, data_dir: Path, what: str = "model.pretrained") -> None:
    """Fine-tuning: the data's token ids must mean what they meant to the pretrained model.
    Data prepared with another tokenizer (`fastlm prepare --tokenizer bpe` instead of the
    model's directory) trains without any error into nonsense; this makes it one. The data's
    vocabulary may extend the model's (added special tokens; the embeddings grow to fit)."""
    import json

    model_dir = Path(pretrained)
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s %s holds no tokenizer: fastlm cannot check that the data in %s was "
                       "tokenized with the model's vocabulary", what, model_dir, data_dir)
        return
    meta = json.loads((data_dir / "meta.json").read_text())
    data_tok = data_dir / meta.get("tokenizer", "tokenizer")
    from transformers import AutoTokenizer

    try:
        ours = AutoTokenizer.from_pretrained(data_tok).get_vocab()
        theirs = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    except (OSError, ValueError) as exc:
        logger.warning("could not compare the tokenizers of %s and %s (%s)", data_tok,
                       model_dir, exc)
        return
    differ = [t for t, i in theirs.items() if ours.get(t) != i]
    if differ:
        raise ConfigError(
            f"data.path {str(data_dir)!r} was tokenized with another vocabulary than "
            f"{what} {str(model_dir)!r} ({len(differ)} of its {len(theirs)} tokens "
            f"differ, e.g. {differ[0]!r}); prepare the data with the model's tokenizer: "
            f"`fastlm prepare INPUT --tokenizer {model_dir} --out DIR`")


@contextlib.contextmanager
def eval_mode(*models):
    """The models in eval mode (dropout off) for the block, each back in its own mode after."""
    models = [m for m in models if m is not None]
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


def check_context(model, block_size: int) -> None:
    """A pretrained model's position table must cover the blocks: an index past a learned table
    (GPT-2's wpe, OPT's and BERT's position embeddings) crashed the first forward with an
    IndexError. Rotary models run past their trained context (context extension): a warning."""
    inputs = model.get_input_embeddings()
    for name, module in _language_model(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (isinstance(module, torch.nn.Embedding) and module is not inputs
                and (leaf == "wpe" or "position" in leaf)):
            rows = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
            if rows < block_size:
                raise ConfigError(
                    f"data.block_size={block_size} is longer than model.pretrained's learned "
                    f"position table ({name}: {rows} positions); use data.block_size <= {rows}")
            return
    ctx = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(ctx, int) and ctx < block_size:
        logger.warning("data.block_size=%d is longer than the model's max_position_embeddings "
                       "(%d): training extends its context past what it was trained on",
                       block_size, ctx)


def _language_model(model) -> torch.nn.Module:
    """The decoder that reads the token positions: a vision-language model's vision tower has
    a position table of its own, over image patches (Gemma 3's 16 here were taken for the
    text's context and a block of 32 refused)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _register_fastlm_attention(cfg: ModelConfig) -> None:
    if cfg.attn_implementation != "fastlm":
        return
    try:
        from fastlm.integrations import transformers as hf_integration
    except ImportError as exc:
        raise ConfigError("model.attn_implementation='fastlm' needs fastlm's transformers "
                          "integration; use 'sdpa' instead") from exc
    hf_integration.register()


def _apply_patch(model) -> None:
    try:
        from fastlm.integrations.patch import patch
    except ImportError:
        logger.warning("fastlm.patch is not available in this build; training with the "
                       "model's own norms, rotary, MLP and loss")
        return
    patch(model, attention=False)


def enable_activation_checkpointing(model) -> None:
    """Recompute every block in the backward: transformers' own checkpointing, non-reentrant
    (the reentrant form needs a block input that requires grad, and torch advises against it).
    The exported config is untouched (use_cache stays on for generation); MFU stays model
    FLOPs, the recompute is not counted as useful work."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not "
                          f"support activation checkpointing in transformers; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and embeddings get no weight decay (GPT-2/
    nanoGPT practice; decaying gains pulls them towards 0 for no regularisation gain)."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue  # tied weights appear once
        seen.add(id(p))
        if p.dim() < 2 or id(p) in embeddings or "norm" in name.lower() or "ln_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    # an empty group is left out (DeepSpeed drops it, and the export matches groups by count):
    # LoRA trains matrices alone
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def cast_buffers_as_built(model, dtype: torch.dtype) -> None:
    """Give each floating buffer the dtype transformers gives it when it builds the model in
    ``dtype`` (read off a copy built on the meta device). ``model.to(bf16)`` cast them all: the
    rotary ``inv_freq`` in bf16 put RoPE's angles ~0.7 off (cosines) by position 4096, where
    transformers keeps it fp32. DeepSpeed's bf16/fp16 engine casts none: MiniMax's decay
    factors stayed fp32 against bf16 activations and its matmul failed (ZeRO 1-3)."""
    try:
        with torch.device("meta"):
            built = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    except Exception:  # noqa: BLE001 - not buildable on meta: buffers stay as they are,
        return  # DeepSpeed's own policy (fp32 frequencies are the costly ones to round)
    want = {name: b.dtype for name, b in built.named_buffers()}
    for name, buf in model.named_buffers():
        target = want.get(name)
        if buf.is_floating_point() and target is not None and buf.dtype != target:
            buf.data = buf.data.to(target)


def to_dtype(model, dtype: torch.dtype) -> None:
    """``model.to(dtype)`` in place, but each buffer as :func:`cast_buffers_as_built` says."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    cast_buffers_as_built(model, dtype)


def lm_class(conf):
    """The transformers auto class that builds ``conf``'s language model with its LM head:
    AutoModelForCausalLM, or for a vision-language checkpoint that class does not list (Qwen2.5-VL,
    Mistral Small 3.1, PaliGemma, LLaVA) AutoModelForImageTextToText, whose models run on text
    alone (fine-tuning one on text failed with transformers' "Unrecognized configuration
    class"); the export is then a directory of the same class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(conf) in auto._model_mapping:
            return auto
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    # say what the model is instead, so the user knows which trainer it needs
    kind = next((what for auto, what in ((AutoModelForSeq2SeqLM, "an encoder-decoder model"),
                                         (AutoModelForMaskedLM, "a masked LM"))
                 if type(conf) in auto._model_mapping), None)
    raise ConfigError(
        f"model_type {conf.model_type!r} ({type(conf).__name__}) has no causal language-model "
        f"head class in transformers (neither AutoModelForCausalLM nor "
        f"AutoModelForImageTextToText lists it){f': it is {kind}' if kind else ''}; fastlm "
        f"trains causal (decoder-only) LMs: pick a preset or checkpoint of one")


def load_lm(path):
    """A causal or vision-language LM from a Hugging Face directory (see :func:`lm_class`)."""
    from transformers import AutoConfig

    return lm_class(AutoConfig.from_pretrained(str(path))).from_pretrained(str(path))


def text_config(model: torch.nn.Module):
    """The config that holds the language model's sizes: a vision-language checkpoint (Gemma 3
    4B and up, Llama 4, Qwen3.5 are ones) keeps them in its ``text_config``, and its top level
    has no ``num_hidden_layers`` or ``max_position_embeddings`` (fine-tuning one crashed)."""
    conf = model.config
    get = getattr(conf, "get_text_config", None)
    return get(decoder=True) if get is not None else conf


def hidden_size(model: torch.nn.Module) -> int | None:
    conf = text_config(model)
    return getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None)


def flops_per_token(model: torch.nn.Module, block_size: int, *,
                    forward_only: bool = False) -> float:
    """Training FLOPs per token: 6N for the weights (N without embeddings' lookups, counted
    once: tied heads are a matmul, so they stay in N; the language model's and the head's: a
    vision-language model's vision tower does no work on text) plus the attention scores and
    their weighted sum, as PaLM's appendix B counts them (12 L d T, no halving for causality),
    layer by layer: see :func:`_attention_flops`. A frozen weight (LoRA's base) costs 4 FLOPs a
    token, not 6: the backward passes the gradient through it but computes none for it.
    ``forward_only``: a forward alone (DPO's reference), 2 a weight and a third of the
    attention's."""
    conf = text_config(model)
    params = {id(p): p for p in _language_model(model).parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        params.update({id(p): p for p in head.parameters()})
    n = sum(p.numel() for p in params.values())
    attention = _attention_flops(conf, hidden_size(model), block_size)
    if forward_only:
        return 2.0 * n + attention / 3
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    return 6.0 * n - 2.0 * frozen + attention


def _attention_flops(conf, width: int | None, block_size: int) -> float:
    """6 T H (Dqk + Dv) a layer: 12 d T where H heads of one head dim make up the width d, but
    Gemma's heads are wider than its width, multi-head latent attention (DeepSeek-V3) has
    queries/keys of 192 and values of 128, a sliding-window layer sees at most its window and a
    linear-attention layer (Qwen3-Next's) has no T x T scores. 0 for a config that names its
    layers otherwise (PI0's): 6N alone."""
    layers = getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layer", None)
    heads = getattr(conf, "num_attention_heads", None) or getattr(conf, "n_head", None)
    if not layers or not (width or heads):
        return 0.0
    per_key = 12.0 * width if width else 0.0
    if isinstance(heads, int) and heads > 0:
        nope, rope = (getattr(conf, k, None) for k in ("qk_nope_head_dim", "qk_rope_head_dim"))
        dqk = getattr(conf, "qk_head_dim", None) or (nope + rope if nope and rope else None) \
            or getattr(conf, "head_dim", None) or (width // heads if width else None)
        if dqk:
            per_key = 6.0 * heads * (dqk + (getattr(conf, "v_head_dim", None) or dqk))
    types = getattr(conf, "layer_types", None)
    if not (isinstance(types, list) and len(types) == layers
            and all(isinstance(t, str) for t in types)):
        types = ["full_attention"] * layers
    window = getattr(conf, "sliding_window", None)
    total = 0.0
    for kind in types:
        if "attention" not in kind or "linear" in kind:
            continue
        span = block_size
        if "sliding" in kind and isinstance(window, int) and window > 0:
            span = min(block_size, window)
        total += per_key * span
    return total
