"""``fastlm bench model``: a transformers model's training step (forward + backward) with and
without fastlm (``attn_implementation="fastlm"`` + ``fastlm.patch``), side by side with SDPA
and eager attention: step time, tokens/s and peak memory, over sequence lengths.

The implementations are timed in alternation. ``vs_best_peer`` is the ratio of medians;
``paired_vs_best_peer`` (fastlm's rows) the median over rounds of the fastest unpatched call
over the patched one in the same round, the steadier of the two on a drifting machine.

Sizes: small built-in shapes per model type (``--model-type``), or a real one from a model
preset (``--preset llama-1b``: configs/models). On a GPU, Liger-Kernel joins as a peer when it
is installed. Liger swaps functions at module level (the rotary function of a modeling file,
for instance), which would change the other implementations' models in the same process, so
its model is built and timed after every other measurement of the run.

A step is the model's forward with labels, and the backward: next-token labels for causal
LMs, and for BERT masked-LM labels on ~15% of the positions, as its pretraining has them.

``--packed N`` packs N sequences of random lengths into every row (position ids restarting,
as transformers' ``DataCollatorWithFlattening`` makes them): transformers builds eager and
SDPA a block-diagonal (B, 1, S, S) mask, and fastlm's attention gets the sequence ids.

``--generate N`` times inference instead: greedy ``generate`` of N new tokens with the KV cache
after a prompt of each ``--seqlens`` length (the prompt's prefill included), reported as ms per
generated token; each row says whether its tokens equal the first implementation's
(``same_tokens``: with fp32 weights they must; in 16-bit, near-ties may legitimately flip).
Masked LMs (BERT) do not generate and are left out.

``peak_gb`` (GPU) is the model's own weights plus what one forward+backward allocates on top
(activations, gradients, the logits and temporaries; no optimizer state): the peak that model
would reach alone, whatever else the bench holds."""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys

import torch
from tqdm import tqdm

from fastlm.bench import harness

_DEC = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            vocab_size=8192)
SIZES = {  # small enough for a CPU run, shaped like the real thing (head dim 32)
    "llama": dict(_DEC, num_key_value_heads=4),
    "mistral": dict(_DEC, num_key_value_heads=4),
    "qwen2": dict(_DEC, num_key_value_heads=4),
    "qwen3": dict(_DEC, num_key_value_heads=4, head_dim=32),
    "gemma": dict(_DEC, num_key_value_heads=1, head_dim=32),
    "phi3": dict(_DEC, pad_token_id=0),
    "gpt_neox": dict(_DEC, intermediate_size=1024),
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8, vocab_size=8192),
    "opt": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                word_embed_proj_dim=256, vocab_size=8192, max_position_embeddings=4096),
    "bert": dict(_DEC, intermediate_size=1024, max_position_embeddings=4096),
    # the architectures fastlm.patch serves beyond those (sliding windows of 256 so the
    # 512-token runs use them)
    "gemma2": dict(_DEC, num_key_value_heads=4, head_dim=32, sliding_window=256,
                   query_pre_attn_scalar=32, pad_token_id=0),
    "gemma3_text": dict(_DEC, num_key_value_heads=4, head_dim=32, sliding_window=256,
                        pad_token_id=0),
    "starcoder2": dict(_DEC, num_key_value_heads=4, intermediate_size=1024, sliding_window=256),
    "olmo2": dict(_DEC, num_key_value_heads=4, pad_token_id=0),
    "phi": dict(_DEC, intermediate_size=1024, partial_rotary_factor=0.5),
    "stablelm": dict(_DEC, num_key_value_heads=8),
    "falcon": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, vocab_size=8192),
    "granite": dict(_DEC, num_key_value_heads=4),
    "mixtral": dict(_DEC, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_DEC, num_key_value_heads=4, head_dim=32, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=344),
    "cohere": dict(_DEC, num_key_value_heads=4, pad_token_id=0),
    # attention sinks; transformers runs them in eager only (no sdpa for GPT-OSS)
    "gpt_oss": dict(_DEC, num_key_value_heads=4, head_dim=32, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=256, pad_token_id=0),
    "glm": dict(_DEC, num_key_value_heads=4, pad_token_id=0),
    "gptj": dict(n_embd=256, n_layer=4, n_head=8, rotary_dim=16, vocab_size=8192),
}
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "opt": dict(dropout=0.0), "bert": dict(hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0)}
IMPLS = ("eager", "sdpa", "fastlm")
MASKED_LM = {"bert"}  # trained with labels on ~15% of the positions (the rest -100)
OPTIONAL_IMPLS = ("liger",)  # GPU only, when installed; timed last (see the module docstring)


def add_arguments(parser) -> None:
    from fastlm.cli import at_least

    parser.add_argument("--model-type", default=None,
                        help=f"one or more (comma-separated) of {', '.join(sorted(SIZES))}, "
                             "or 'all' (default llama), at the bench's small sizes")
    parser.add_argument("--preset", default=None,
                        help="instead: a model preset of configs/models (e.g. llama-1b, "
                             "gpt2-124m) or a YAML file of HF config keys, at its real size")
    parser.add_argument("--impls", default=None,
                        help=f"comma list of {', '.join(IMPLS + OPTIONAL_IMPLS)} (default: "
                             "the first three, and liger on a GPU when it is installed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seqlens", default="256,512,1024", type=harness.comma_list(int))
    parser.add_argument("--batch", type=at_least(1), default=2)
    parser.add_argument("--repeat", type=at_least(1), default=5,
                        help="timed rounds at least (more when --min-seconds asks for them)")
    parser.add_argument("--min-seconds", type=at_least(0, float), default=3.0,
                        help="time each implementation for at least this long per length: "
                             "short steps get more rounds (this VM drifts by a few %%)")
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="time greedy generation of N tokens with the KV cache after a "
                             "prompt of each --seqlens length (inference), not training steps")
    parser.add_argument("--packed", type=int, default=None, metavar="N",
                        help="training steps on rows that each pack N sequences (position ids "
                             "restarting, as DataCollatorWithFlattening makes them): eager and "
                             "sdpa get transformers' block-diagonal mask, fastlm segment ids")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default=None)


def _config(kind: str, preset: str | None, max_len: int):
    from transformers import AutoConfig

    # dropout off: attention dropout would send every implementation to a different path
    if preset is not None:
        keys = _preset_keys(preset)
        keys.pop("model_type")
        conf = AutoConfig.for_model(kind, **{**keys, **NO_DROPOUT.get(kind, {})})
    else:
        conf = AutoConfig.for_model(kind, **SIZES[kind], **_special_ids(kind, SIZES[kind]),
                                    **NO_DROPOUT.get(kind, {}))
    ctx = "n_positions" if hasattr(conf, "n_positions") else "max_position_embeddings"
    if hasattr(conf, ctx):
        setattr(conf, ctx, max(getattr(conf, ctx) or 0, max_len, 4096 if preset is None else 0))
    return conf


def _special_ids(kind: str, sizes: dict) -> dict:
    """The architecture's default special token ids that lie past the bench's vocabulary
    (GPT-2's 50256, Phi-3's 32000, ...), moved to its last id: transformers warned about each
    at every config built."""
    from transformers import CONFIG_MAPPING

    from fastlm.integrations.transformers import quiet

    vocab = sizes.get("vocab_size")
    with quiet():  # a default config may warn about its own defaults
        defaults = CONFIG_MAPPING[kind]()
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        if vocab is not None and key not in sizes and isinstance(value, int) and value >= vocab:
            out[key] = vocab - 1
    return out


def _preset_keys(preset: str) -> dict:
    import yaml

    from fastlm.cli import UserError
    from fastlm.train.config import ConfigError
    from fastlm.train.model import preset_path

    try:
        keys = yaml.safe_load(preset_path(preset).read_text()) or {}
    except ConfigError as e:
        raise UserError(f"--preset: {e}") from None
    if "model_type" not in keys:
        raise UserError(f"--preset {preset!r} has no model_type key")
    return keys


def _model(conf, impl: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    import fastlm

    torch.manual_seed(0)
    attn = impl if impl in ("eager", "sdpa") else "sdpa"
    auto = AutoModelForMaskedLM if conf.model_type in MASKED_LM else AutoModelForCausalLM
    try:
        # built in the dtype, as users build it: transformers keeps buffers such as RoPE's
        # inv_freq in fp32 then, where model.to(bf16) would round them
        model = auto.from_config(conf, attn_implementation=attn, dtype=dtype)
    except ValueError:  # a model without SDPA (Gemma 2): the patched ones start from eager
        if impl == "sdpa":
            raise
        torch.manual_seed(0)
        model = auto.from_config(conf, attn_implementation="eager", dtype=dtype)
    model = model.to(device)
    if impl == "fastlm":
        fastlm.patch(model)  # attention + norms + MLP activations + fused loss
    elif impl == "liger":
        _apply_liger(model)
    return model.train()


def _liger_types() -> set[str] | None:
    """Model types Liger-Kernel patches, or None when it is not installed."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _apply_liger(model) -> None:
    # Liger's per-instance entry point: its defaults swap RMSNorm, rotary, SwiGLU and the
    # fused linear cross-entropy, the same set fastlm.patch swaps
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def _impls(spec: str | None, device: str) -> list[str]:
    from fastlm.cli import UserError

    on_gpu = device.startswith("cuda")
    if spec is None:
        return list(IMPLS) + (["liger"] if on_gpu and _liger_types() is not None else [])
    impls = [i.strip() for i in spec.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS + OPTIONAL_IMPLS]
    if bad or "fastlm" not in impls or len(impls) < 2:
        raise UserError(f"--impls {spec!r}: choose fastlm and at least one peer from "
                        f"{', '.join(IMPLS + OPTIONAL_IMPLS)}" + (f" (unknown: {bad})" if bad
                                                                   else ""))
    if "liger" in impls and not on_gpu:
        raise UserError("--impls liger: Liger-Kernel's kernels are Triton GPU kernels; "
                        "use --device cuda")
    if "liger" in impls and _liger_types() is None:
        raise UserError("--impls liger: Liger-Kernel is not installed (pip install liger-kernel)")
    return impls


def _params_gb(model) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def _kinds(spec: str | None, preset: str | None) -> list[str]:
    from fastlm.cli import UserError

    if preset is not None:
        kind = _preset_keys(preset)["model_type"]
        if spec is not None and spec != kind:
            raise UserError(f"--preset {preset!r} is a {kind} model; drop --model-type {spec}")
        if kind not in SIZES:
            raise UserError(f"--preset {preset!r}: model type {kind!r} is not one the bench "
                            f"covers ({', '.join(sorted(SIZES))})")
        return [kind]
    spec = spec or "llama"
    kinds = sorted(SIZES) if spec == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SIZES]
    if bad or not kinds:
        raise UserError(f"--model-type {spec!r}: unknown {bad}; choose from "
                        f"{', '.join(sorted(SIZES))} or 'all'")
    return kinds


def run(args) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    kinds = _kinds(args.model_type, args.preset)
    impls = _impls(args.impls, args.device)
    generate = getattr(args, "generate", None)
    if generate is not None:
        from fastlm.cli import UserError

        if generate < 1:
            raise UserError(f"--generate {generate}: the number of new tokens must be >= 1")
        kinds = [k for k in kinds if k not in MASKED_LM]
        if not kinds:
            raise UserError("--generate: masked LMs (bert) do not generate; choose a causal LM")
    seqlens = [int(x) for x in args.seqlens.split(",")]
    packed = getattr(args, "packed", None)
    if packed is not None:
        from fastlm.cli import UserError

        if generate is not None:
            raise UserError("--packed times training steps; drop it or --generate")
        if packed < 1 or packed > min(seqlens):
            raise UserError(f"--packed {packed}: the number of sequences a row must be between "
                            f"1 and the shortest --seqlens length")
        kinds = [k for k in kinds if k not in MASKED_LM]
        if not kinds:
            raise UserError("--packed: masked LMs (bert) take no packing by position ids; "
                            "choose a causal LM")
    if args.preset is not None:
        tag = args.preset.rsplit("/", 1)[-1].removesuffix(".yaml")
    else:
        tag = kinds[0] if len(kinds) == 1 else "all" if len(kinds) == len(SIZES) else "_".join(kinds)
    mode = "generate_" if generate else f"packed{packed}_" if packed else ""
    report = harness.Report(
        name=args.name or f"model_{tag}_{mode}{args.device}",
        command="fastlm bench model " + shlex.join(sys.argv[3:]), device=args.device,
        env=harness.environment(args.device))
    time_fn = _time_generation if generate else _time_lengths
    together = [i for i in impls if i not in OPTIONAL_IMPLS]
    later = [(k, i) for k in kinds for i in impls if i in OPTIONAL_IMPLS]
    liger_types = _liger_types() if later else None
    for kind in tqdm(kinds, desc="bench model", disable=None):
        conf = _config(kind, args.preset, max(seqlens))
        models = {}
        for impl in together:
            try:
                models[impl] = _model(conf, impl, args.device, dtype)
            except ValueError as exc:  # Gemma 2 refuses SDPA (its soft-capping)
                if impl != "sdpa":
                    raise
                print(f"sdpa: {kind} refuses it ({str(exc).split('. ')[0]}); no row")
        for s in seqlens:
            time_fn(args, report, kind, s, models, dtype)
        del models
    for kind, impl in later:  # after everything else: Liger patches module-level functions
        if impl == "liger" and kind not in liger_types:
            print(f"liger: no Liger-Kernel patch for model type {kind!r}; no row")
            continue
        model = _model(_config(kind, args.preset, max(seqlens)), impl, args.device, dtype)
        for s in seqlens:
            time_fn(args, report, kind, s, {impl: model}, dtype)
        del model
    harness.add_speedup(report, "vs_best_peer", ["model", "seqlen"],
                        lambda r: r["impl"] != "fastlm")
    print(harness.format_table(report.rows))
    if args.out:
        paths = report.write(args.out)
        png = f"{args.out}/{report.name}.png"
        if len(kinds) == 1:
            paths.append(harness.plot(report, png, x="seqlen", y="tokens_per_s", series="impl",
                                      ylabel="generated tokens/s" if generate
                                      else "training tokens/s"))
        else:  # one line per model: the patched model's speed over the best unpatched one
            ours = dataclasses.replace(report, rows=[r for r in report.rows
                                                     if r["impl"] == "fastlm"])
            paths.append(harness.plot(ours, png, x="seqlen", y="vs_best_peer", series="model",
                                      ylabel="fastlm.patch speed / best of eager, sdpa"
                                      + (" (generation)" if generate else "")))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _time_lengths(args, report, kind: str, s: int, models: dict, dtype) -> None:
    """Times one training step (forward + backward) of each model at length s, alternating."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, s), device=args.device)
    labels = ids
    packed = getattr(args, "packed", None)
    extra = {} if packed is None else {"position_ids": _packed_positions(args.batch, s, packed,
                                                                         args.device)}
    if kind in MASKED_LM:  # a masked-LM step predicts ~15% of the positions, as BERT trains
        keep = torch.rand(ids.shape, device=args.device) < 0.15
        keep[:, 0] = True  # never none
        labels = torch.where(keep, ids, torch.full_like(ids, -100))

    def step(i, m, x=ids, y=labels):
        m.zero_grad(set_to_none=True)  # gradients are made inside the step: in its peak
        m(x, labels=y, **extra).loss.backward()

    steps = {impl: (lambda i, m=m: step(i, m)) for impl, m in models.items()}
    probe, _ = harness.time_interleaved(steps, device=args.device, warmup=1, repeat=1)
    slowest = max(t.median_ms for t in probe.values()) * 1e-3
    repeat = max(args.repeat, math.ceil(args.min_seconds / max(slowest, 1e-6)))
    timings, peaks = harness.time_interleaved(steps, device=args.device, warmup=0, repeat=repeat)
    paired = harness.paired_speedup(timings, "fastlm", [i for i in models if i != "fastlm"])
    for impl, t in timings.items():
        peak = peaks[impl]
        report.add(model=kind, impl=impl, dtype=str(dtype).split(".")[-1], seqlen=s,
                   batch=args.batch, **({} if packed is None else {"packed": packed}),
                   rounds=t.n, ms=t.median_ms,
                   tokens_per_s=args.batch * s / (t.median_ms * 1e-3),
                   peak_gb=None if peak is None else peak + _params_gb(models[impl]),
                   paired_vs_best_peer=paired if impl == "fastlm" else None)
    for m in models.values():
        m.zero_grad(set_to_none=True)


def _packed_positions(batch: int, s: int, n: int, device) -> torch.Tensor:
    """(batch, s) position ids of n sequences a row, random lengths (>= 1) summing to s."""
    g = torch.Generator().manual_seed(s * 1000 + n)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(s - 1, generator=g)[: n - 1].add(1).sort().values.tolist()
        edges = [0, *cuts, s]
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(edges, edges[1:])]))
    return torch.stack(rows).to(device)


def _time_generation(args, report, kind: str, s: int, models: dict, dtype) -> None:
    """Times greedy generation of --generate tokens after an s-token prompt, alternating."""
    n = args.generate
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, s), device=args.device)
    tokens = {}

    def gen(i, impl, m):
        with torch.no_grad():  # min_new_tokens: an end-of-sequence token must not stop it
            tokens[impl] = m.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    for m in models.values():
        m.eval()
    steps = {impl: (lambda i, impl=impl, m=m: gen(i, impl, m)) for impl, m in models.items()}
    probe, _ = harness.time_interleaved(steps, device=args.device, warmup=1, repeat=1)
    slowest = max(t.median_ms for t in probe.values()) * 1e-3
    repeat = max(args.repeat, math.ceil(args.min_seconds / max(slowest, 1e-6)))
    timings, peaks = harness.time_interleaved(steps, device=args.device, warmup=0, repeat=repeat)
    paired = harness.paired_speedup(timings, "fastlm", [i for i in models if i != "fastlm"])
    first = tokens[next(iter(models))]
    for impl, t in timings.items():
        report.add(model=kind, impl=impl, dtype=str(dtype).split(".")[-1], seqlen=s,
                   batch=args.batch, new_tokens=n, rounds=t.n, ms=t.median_ms,
                   ms_per_token=t.median_ms / n, tokens_per_s=args.batch * n / (t.median_ms * 1e-3),
                   same_tokens=bool(torch.equal(tokens[impl], first)),
                   peak_gb=None if peaks[impl] is None else peaks[impl] + _params_gb(models[impl]),
                   paired_vs_best_peer=paired if impl == "fastlm" else None)
    for m in models.values():
        m.train()
