"""``python -m fastlm.demo``: a tiny GPT trained on the CPU with fastlm's kernels, in minutes.

The data is English prose every Python ships (``pydoc_data.topics``, ~0.8 MB), tokenised by
character, so a fresh machine needs no download. The model is a minimal GPT whose attention is
``fastlm.ops.attention`` (the C++ CPU backend here) and whose optimizer is ``FusedAdamW``; the
run shows progress, validation loss and perplexity, and a generated sample.

This stands in for the full trainer (``fastlm train``) where that is not installed.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm.ops import attention
from fastlm.optim import FusedAdamW


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, block: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2
        # GPT-2's init: N(0, 1) embeddings (torch's default) would start with logits of std
        # sqrt(width) through the tied head, and a loss far above log(vocab).
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx):  # (B, T) -> (B, T, V)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def batch(data: torch.Tensor, block: int, size: int, gen: torch.Generator):
    ix = torch.randint(len(data) - block - 1, (size,), generator=gen)
    x = torch.stack([data[i : i + block] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix.tolist()])
    return x, y


@torch.no_grad()
def evaluate(model, data, block, batches=10, size=32) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same validation batches every time
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in (batch(data, block, size, gen) for _ in range(batches))]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model, stoi, itos, block, prompt="The ", length=200, temperature=0.8) -> str:
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([[stoi[c] for c in prompt if c in stoi]])
    model.eval()
    for _ in range(length):
        logits = model(idx[:, -block:])[:, -1] / temperature
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=gen)], dim=1)
    return "".join(itos[i] for i in idx[0].tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=250)
    args = p.parse_args(argv)
    from tqdm import tqdm

    torch.manual_seed(0)
    text = corpus()
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = TinyGPT(len(chars), args.width, args.layers, args.heads, args.block)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = FusedAdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                     lr=args.lr, betas=(0.9, 0.99))
    print(f"corpus: {len(text) / 1e6:.2f} MB of pydoc text, vocab {len(chars)} chars; model: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    gen = torch.Generator().manual_seed(0)
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(1, args.steps + 1), desc="training")
    for step in bar:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch(train, args.block, args.batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += x.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if step % args.eval_every == 0 or step == args.steps:
            v = evaluate(model, val, args.block)
            tqdm.write(f"step {step}: val loss {v:.3f}, perplexity {math.exp(v):.1f}")
    print("\nsample:\n" + sample(model, stoi, itos, args.block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
