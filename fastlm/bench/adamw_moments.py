"""``fastlm bench adamw-moments``: what bf16 optimizer moments cost in accuracy.

``FusedAdamW(state_dtype=torch.bfloat16)`` halves the moment memory (and moves 20 instead of
28 bytes per parameter per step) by rounding m and v to 8 mantissa bits every step. This
trains the same tiny byte-level Llama twice, same seed and batches, once with fp32 moments and
once with bf16 moments, and reports the training-loss curves and the final held-out loss.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastlm.bench import harness

MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
             max_position_embeddings=512)


def add_arguments(parser) -> None:
    from fastlm.cli import at_least, positive

    parser.add_argument("--text", default=None,
                        help="a UTF-8 text file (default: Python's own pydoc topics text)")
    parser.add_argument("--steps", type=at_least(1), default=300)
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--block", type=at_least(1), default=128)
    parser.add_argument("--lr", type=positive, default=2e-3)
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")


def _corpus(path: str | None) -> torch.Tensor:
    from fastlm.cli import UserError

    if path is None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--text {path}: cannot read it as UTF-8 text ({exc})") from None
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    if data.numel() < 20_000:
        raise UserError(f"--text {path}: {data.numel()} bytes; need at least 20000")
    return data


def _train(data, val, state_dtype, args, progress):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastlm.optim import FusedAdamW

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL),
                                             attn_implementation="sdpa")
    opt = FusedAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                     state_dtype=state_dtype)
    g = torch.Generator().manual_seed(1)  # the same batches for both runs
    curve = []
    for _ in range(args.steps):
        start = torch.randint(0, data.numel() - args.block - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s:s + args.block] for s in start.tolist()])
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(float(loss))
        progress.update()
    model.eval()
    with torch.no_grad():
        n = (val.numel() - 1) // args.block
        blocks = val[: n * args.block].view(n, args.block)
        val_loss = sum(float(model(b[None], labels=b[None]).loss) for b in blocks) / n
    moment_bytes = sum(s[k].numel() * s[k].element_size() for s in opt.state.values()
                       for k in ("exp_avg", "exp_avg_sq"))
    return curve, val_loss, moment_bytes


def run(args) -> int:
    data = _corpus(args.text)
    cut = int(data.numel() * 0.9)
    train, val = data[:cut], data[cut:][: 64 * args.block + 1]  # a fixed held-out slice
    command = "fastlm bench adamw-moments " + shlex.join(sys.argv[3:])
    report = harness.Report("adamw_moments", command, "cpu", env=harness.environment("cpu"))
    results = {}
    with tqdm(total=2 * args.steps, desc="adamw-moments", disable=None) as progress:
        for dtype in (torch.float32, torch.bfloat16):
            results[dtype] = _train(train, val, dtype, args, progress)
    window = max(1, args.steps // 30)  # the curve as means over windows of steps
    for dtype, (curve, val_loss, nbytes) in results.items():
        name = str(dtype).split(".")[-1]
        for i in range(0, len(curve), window):
            chunk = curve[i:i + window]
            report.add(moments=name, step=i + len(chunk), train_loss=sum(chunk) / len(chunk))
        report.summary[f"val_loss_{name}"] = val_loss
        report.summary[f"moment_mb_{name}"] = nbytes / 2**20
    f32, b16 = (results[d][1] for d in (torch.float32, torch.bfloat16))
    report.summary["val_loss_rel_diff"] = (b16 - f32) / f32
    print(harness.format_table(report.rows[-2:] if len(report.rows) > 2 else report.rows))
    print(f"held-out loss: fp32 moments {f32:.4f}, bf16 moments {b16:.4f} "
          f"({100 * (b16 - f32) / f32:+.2f}%); perplexity {math.exp(f32):.3f} vs "
          f"{math.exp(b16):.3f}")
    if args.out:
        paths = report.write(args.out)
        paths.append(harness.plot(report, f"{args.out}/{report.name}.png", x="step",
                                  y="train_loss", series="moments", logx=False,
                                  ylabel="training loss (window mean)"))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
