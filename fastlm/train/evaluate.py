"""``fastlm eval``: loss and perplexity of a model on a prepared split or a text file.

Every token of the split is scored once (up to ``--max-tokens``), in windows of
``--block-size`` tokens of the documents concatenated as training reads them. A ``--stride``
shorter than the block is the sliding-window perplexity of transformers' guide: windows start
``stride`` tokens apart and each scores only the targets no earlier window scored, so every
token but the first block's is predicted from at least ``block - stride`` tokens of context.
SFT data scores the response tokens only, as training does. The loss is the training loss
(fastlm's fused LM head + cross-entropy where it applies, the full logits elsewhere).
Preference pairs are scored by answer instead (fastlm.train.pair_eval), multiple-choice
records with ``--choices`` (fastlm.train.choices).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


class EvalError(Exception):
    user_facing = True


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy (nats) per scored token
    perplexity: float
    tokens: int  # targets scored
    windows: int
    block_size: int
    stride: int
    # tokenizer-independent: the scored targets' nats in bits over the UTF-8 bytes of their
    # text (None without a tokenizer to decode them); comparable across vocabularies
    bits_per_byte: float | None = None
    bytes: int | None = None


def token_stream(data: str | Path, split: str, tokenizer=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, keep): a prepared split's shards concatenated (keep: the SFT loss mask, 1 where
    a target counts, or None), or a text file encoded with ``tokenizer``."""
    path = Path(data)
    if path.is_dir():
        from fastlm.data.format import FormatError, open_split

        try:
            sp = open_split(path, split)
        except FormatError as exc:
            other = "train" if split == "val" else "val"
            raise EvalError(f"{exc} (or evaluate another split: --split {other})") from exc
        tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in sp.shards])
        try:
            sp.check_ids(tokens)
        except FormatError as exc:
            raise EvalError(str(exc)) from exc
        masks = [s.mask for s in sp.shards]
        keep = None if masks[0] is None else np.concatenate([np.asarray(m) for m in masks])
        return tokens, keep
    if not path.is_file():
        raise EvalError(f"{path} not found: give a prepared dataset directory (fastlm "
                        f"prepare) or a text file")
    if tokenizer is None:
        raise EvalError(f"{path} is a text file, and the model comes with no tokenizer to "
                        f"encode it: prepare it with `fastlm prepare {path} --tokenizer "
                        f"MODEL_DIR --out DIR` and evaluate DIR")
    from fastlm.data.errors import DataError
    from fastlm.data.readers import open_bytes

    try:  # x.txt.gz as the corpus readers take it
        with open_bytes(path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    except Exception as exc:  # damaged or truncated compressed file
        raise EvalError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    return np.asarray(tokenizer(text).input_ids, dtype=np.int64), None


def scored_bytes(tokens: np.ndarray, keep: np.ndarray | None, tokenizer) -> int:
    """UTF-8 bytes of the text of the targets :func:`evaluate` scores (every token after the
    first; SFT: those the mask keeps), decoded run by run; special tokens (EOS) are no text."""
    scored = np.ones(len(tokens), bool)
    scored[0] = False
    if keep is not None:
        scored &= keep.astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], scored.astype(np.int8), [0]])))
    return sum(len(tokenizer.decode(tokens[a:b].tolist(), skip_special_tokens=True)
                   .encode("utf-8")) for a, b in zip(edges[::2], edges[1::2]))


def windows(n: int, block: int, stride: int):
    """(begin, end, first) for each window over n tokens: inputs [begin, end), targets
    [begin + 1, end + 1) of which those from index ``first`` in the window on are scored."""
    scored_to, begin = 0, 0  # targets 1..scored_to are done
    while scored_to < n - 1:
        end = min(begin + block, n - 1)
        yield begin, end, max(0, scored_to - begin)
        scored_to = end
        begin += stride


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, keep: np.ndarray | None = None, *, block_size: int,
             stride: int | None = None, batch_size: int = 8, progress: bool = True,
             fused: bool = True) -> EvalResult:
    """Mean cross-entropy of ``model`` over ``tokens`` (see the module docstring); ``fused``
    False computes it from the full logits with ``F.cross_entropy``."""
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise EvalError(f"--stride must be between 1 and the block size ({block_size}), "
                        f"got {stride}")
    if len(tokens) < 2:
        raise EvalError("the data holds fewer than 2 tokens: nothing to predict")
    device = next(model.parameters()).device
    plan = list(windows(len(tokens), block_size, stride))
    total, count = 0.0, 0
    from tqdm import tqdm

    from fastlm.train.model import eval_mode

    with eval_mode(model), tqdm(total=len(plan), desc="eval", unit="window",
                                disable=not progress) as bar:
        i = 0
        while i < len(plan):
            length = plan[i][1] - plan[i][0]
            group = [plan[i]]  # windows of one length go through the model together
            while (len(group) < batch_size and i + len(group) < len(plan)
                   and plan[i + len(group)][1] - plan[i + len(group)][0] == length):
                group.append(plan[i + len(group)])
            ids = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in group])).to(device)
            targets = torch.from_numpy(np.stack([tokens[b + 1:e + 1] for b, e, _ in group]))
            for row, (b, e, first) in enumerate(group):
                targets[row, :first] = IGNORE
                if keep is not None:
                    targets[row][torch.from_numpy(keep[b + 1:e + 1] == 0)] = IGNORE
            targets = targets.to(device)
            loss_sum = _loss_sum(model, ids, targets, fused)
            n = int((targets != IGNORE).sum())
            total += float(loss_sum)
            count += n
            i += len(group)
            bar.update(len(group))
    if count == 0:
        raise EvalError("no target was scored (SFT data whose responses are all masked?)")
    loss = total / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count,
                      windows=len(plan), block_size=block_size, stride=stride)


def _loss_sum(model, ids: torch.Tensor, targets: torch.Tensor, fused: bool) -> torch.Tensor:
    """Summed cross-entropy of the scored targets: the fused head where the model's head-to-loss
    path is known (the logits never exist), else from the full logits."""
    from fastlm.integrations._patch_loss import head_loss, loss_unsupported

    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if fused and loss_unsupported(model) is None:
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return head_loss(model, hidden, targets, ignore_index=IGNORE, reduction="sum")
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("model", help="HF model directory, PEFT adapter directory (its base "
                        "a local directory), run directory or checkpoint")
    parser.add_argument("data", help="a prepared dataset directory (fastlm prepare; of "
                                     "preference pairs: how the model ranks their answers) or "
                                     "a text file (encoded with the model's tokenizer)")
    parser.add_argument("--split", default="val", help="split of a prepared dataset")
    from fastlm.cli import at_least

    parser.add_argument("--block-size", type=at_least(1), default=None,
                        help="tokens per window (default: the blocks a fastlm run trained the "
                        "model on, else its context; at most 1024)")
    parser.add_argument("--stride", type=at_least(1), default=None,
                        help="tokens between window starts (default: the block size; shorter "
                             "gives every scored token more context)")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="windows per forward")
    parser.add_argument("--max-tokens", type=at_least(2), default=None,
                        help="evaluate only the first N tokens")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on a CPU, bf16 on a GPU that has it")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--no-kernels", action="store_true",
                        help="run transformers' own code (no fastlm.patch, the loss from the "
                             "full logits), to compare")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--reference", default=None, metavar="MODEL",
                        help="DATA of preference pairs (fastlm prepare --preference): the model "
                             "the preference tuning started from; reports DPO's implicit "
                             "reward accuracy, margin and loss")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="with --reference: DPO's beta (train.dpo_beta)")
    parser.add_argument("--choices", action="store_true",
                        help="DATA is a JSONL file of multiple-choice records (HellaSwag's "
                             "ctx/endings/label): report accuracy by completion likelihood")


def run(args) -> int:
    from fastlm.train.config import ConfigError
    from fastlm.train.generate import context_length, load_model_dir, load_tokenizer, tokenizer_dir
    from fastlm.train.model import check_tokenizer

    if not Path(args.model).exists():
        raise EvalError(f"{args.model} not found (give an HF directory or a fastlm run)")
    if not Path(args.data).exists():
        raise EvalError(f"{args.data} not found: give a prepared dataset directory (fastlm "
                        f"prepare) or a text file")
    pairs = _is_pairs(args.data)
    if args.reference is not None and not pairs:
        raise EvalError(f"--reference compares answers of preference pairs: {args.data} is not "
                        f"a directory prepared with `fastlm prepare --preference`")
    if args.reference is not None and not Path(args.reference).exists():
        raise EvalError(f"--reference {args.reference} not found")
    if args.beta <= 0:
        raise EvalError(f"--beta must be > 0, got {args.beta}")
    model, root = load_model_dir(args.model)
    tok_dir = tokenizer_dir(root)
    tok = None if tok_dir is None else load_tokenizer(tok_dir)
    if Path(args.data).is_dir() and tok_dir is not None:
        try:
            check_tokenizer(str(tok_dir), Path(args.data), what="the model")
        except ConfigError as exc:
            raise EvalError(str(exc)) from exc
    device, dtype = device_and_dtype(args.device, args.dtype)
    place_model(model, device, dtype, kernels=not args.no_kernels)
    ctx = context_length(model)
    trained = context_length(model, trained=True)
    if args.choices:
        return _run_choices(args, model, tok, device, trained)
    if pairs:
        reference = None
        if args.reference is not None:
            reference, ref_root = load_model_dir(args.reference)
            if tokenizer_dir(ref_root) is not None:
                try:
                    check_tokenizer(str(tokenizer_dir(ref_root)), Path(args.data),
                                    what="the reference")
                except ConfigError as exc:
                    raise EvalError(str(exc)) from exc
            place_model(reference, device, dtype, kernels=not args.no_kernels)
        return _run_pairs(args, model, reference, min(trained or 1024, 1024))
    # by default the windows a run trained the model on (positions past them never learned)
    block = args.block_size or min(trained or 1024, 1024)
    if block < 1 or (ctx is not None and block > ctx):
        raise EvalError(f"--block-size {block} is outside the model's context (1..{ctx})")
    tokens, keep = token_stream(args.data, args.split, tok)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
        keep = None if keep is None else keep[: args.max_tokens]
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokens) and int(tokens.max()) >= vocab:
        raise EvalError(f"the data holds token id {int(tokens.max())}, past the model's "
                        f"vocabulary of {vocab}: it was tokenized for another model")
    result = evaluate(model, tokens, keep, block_size=block, stride=args.stride,
                      batch_size=args.batch_size, fused=not args.no_kernels)
    if tok is not None:
        result.bytes = scored_bytes(tokens, keep, tok)
        if result.bytes:
            result.bits_per_byte = result.loss * result.tokens / (math.log(2) * result.bytes)
    bpb = "" if result.bits_per_byte is None else f", {result.bits_per_byte:.4f} bits/byte"
    print(f"loss {result.loss:.4f}, perplexity {result.perplexity:.2f}{bpb} over "
          f"{result.tokens} tokens ({result.windows} windows of {result.block_size}, stride "
          f"{result.stride})")
    if args.json:
        _write_json(args.json, dict(asdict(result), model=str(args.model), data=str(args.data),
                                    split=args.split))
    return 0


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default: cuda where there is one) and ``--dtype`` (default: bf16 on a GPU
    with bf16 tensor cores, else fp32) of eval and generate."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise EvalError(f"--device {device!r}: {exc} (give cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: this torch sees no CUDA GPU; use --device cpu")
    if dtype is None and dev.type == "cuda":
        from fastlm.train.engine import native_bf16

        # emulated bf16 (V100, T4) is slow; fp16 overflows in some models' activations
        dtype = "bf16" if native_bf16(dev) else "fp32"
    name = dtype or "fp32"
    return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def place_model(model, device, dtype, *, kernels: bool) -> None:
    """``model`` on ``device`` in ``dtype`` (and patched with fastlm's kernels), for eval and
    generate."""
    from fastlm.train.model import to_dtype

    model.to(device=device)
    to_dtype(model, dtype)  # RoPE's inv_freq stays fp32, as transformers builds it
    if kernels:
        import fastlm

        fastlm.patch(model)


def _is_pairs(data: str) -> bool:
    from fastlm.data.format import read_meta

    path = Path(data)
    return (path / "meta.json").is_file() and bool(read_meta(path).get("preference"))


def _run_pairs(args, model, reference, block: int) -> int:
    from fastlm.data.format import FormatError
    from fastlm.data.pairs import PairLoader
    from fastlm.train.pair_eval import describe, evaluate_pairs

    try:
        loader = PairLoader(args.data, args.block_size or block, 1, split_name=args.split)
    except (FormatError, FileNotFoundError) as exc:
        raise EvalError(f"{args.data}: {exc}") from exc
    result = evaluate_pairs(model, loader, reference=reference, beta=args.beta,
                            batch_size=args.batch_size, fused=not args.no_kernels)
    print(describe(result))
    if args.json:
        _write_json(args.json, dict(asdict(result), model=str(args.model), data=str(args.data),
                                    split=args.split, reference=args.reference))
    return 0


def _run_choices(args, model, tok, device, ctx) -> int:
    from fastlm.train.choices import accuracy, read_choices

    if tok is None:
        raise EvalError(f"--choices: {args.model} comes with no tokenizer to encode the records")
    records = read_choices(args.data)
    result = accuracy(model, tok, records, device=device, max_length=ctx, progress=True,
                      fused=not args.no_kernels)
    print(f"accuracy {result.acc:.4f} (by mean loss per ending token: {result.acc_norm:.4f}) "
          f"over {result.examples} records")
    if args.json:
        _write_json(args.json, dict(asdict(result), model=str(args.model), data=str(args.data)))
    return 0


def _write_json(path: str, payload: dict) -> None:
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
