"""Multiple-choice accuracy by completion likelihood (HellaSwag's layout, as llm.c scores it).

Each record gives a context, its candidate endings and the right one's index; the model reads
context + ending for every candidate, and the candidate whose ending tokens it finds likeliest
wins: ``acc`` by the summed loss of the ending, ``acc_norm`` by the loss per ending token (as
llm.c scores HellaSwag; lm-eval-harness divides by the ending's bytes instead). Records are read
from a local JSONL file: nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm.integrations._patch_loss import fusable_head, head_loss
from fastlm.train.model import eval_mode

_IGNORE = -100  # targets outside the endings


class ChoicesError(Exception):
    user_facing = True


@dataclass
class Choice:
    context: str
    endings: list[str]
    label: int


@dataclass
class ChoicesResult:
    acc: float  # the likeliest ending by summed loss is the labelled one
    acc_norm: float  # ... by mean loss per ending token
    examples: int


def read_choices(path: str | Path, limit: int | None = None) -> list[Choice]:
    """Records ``{"ctx" | "context", "endings" | "choices", "label"}`` of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise ChoicesError(f"{path} not found: give a JSONL file of multiple-choice records")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            context = row["ctx"] if "ctx" in row else row["context"]
            endings = row["endings"] if "endings" in row else row["choices"]
            label = int(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ChoicesError(f"{path}:{n}: not a multiple-choice record ({exc!r}); expected "
                               f'{{"ctx": ..., "endings": [...], "label": i}} (or "context", '
                               f'"choices")') from exc
        if not (isinstance(endings, list) and len(endings) >= 2
                and all(isinstance(e, str) and e for e in endings)
                and isinstance(context, str) and 0 <= label < len(endings)):
            raise ChoicesError(f"{path}:{n}: needs a context string, 2+ non-empty endings and "
                               f"a label indexing them")
        out.append(Choice(context, endings, label))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ChoicesError(f"{path} holds no records")
    return out


@torch.no_grad()
def ending_losses(model, tokenizer, choice: Choice, device=None, max_length: int | None = None,
                  fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, token count) of each ending after the context, all endings in one batch
    (right-padded; the attention mask keeps the padding out). ``fused``: where the model's
    head allows, the LM head runs in chunks on the final hidden states with the per-token
    losses (fastlm's fused linear cross-entropy), never the (endings x tokens x vocab) logits."""
    device = device or next(model.parameters()).device
    ctx = tokenizer(choice.context, add_special_tokens=False).input_ids
    rows, spans = [], []
    for ending in choice.endings:
        # the ending tokenized after the context's text, as the model would read it
        full = tokenizer(choice.context + ending, add_special_tokens=False).input_ids
        n_ctx = _common_prefix(ctx, full)
        if n_ctx == len(full) or n_ctx == 0:
            raise ChoicesError(f"an ending or the context tokenizes to nothing: {choice!r}")
        if max_length is not None and len(full) > max_length:
            cut = len(full) - max_length  # drop the context's start, keep the ending
            if cut >= n_ctx:
                raise ChoicesError(f"an ending is longer than the model's context ({max_length}"
                                   f" tokens)")
            full, n_ctx = full[cut:], n_ctx - cut
        rows.append(full)
        spans.append((n_ctx, len(full)))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    targets = torch.full((len(rows), width - 1), _IGNORE)  # token t + 1, the ending's only
    for i, (a, b) in enumerate(spans):
        targets[i, a - 1:b - 1] = ids[i, a:b]
    inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    targets = targets.to(device)
    if fused and fusable_head(model):
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        losses = head_loss(model, hidden[:, :-1], targets, ignore_index=_IGNORE,
                           reduction="none")
    else:
        logits = model(**inputs).logits.float()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=_IGNORE,
                                 reduction="none")
    count = torch.tensor([b - a for a, b in spans], dtype=torch.float32)
    return losses.sum(-1).cpu(), count


def accuracy(model, tokenizer, choices: list[Choice], *, device=None, max_length=None,
             progress: bool = False, rank: int = 0, world: int = 1,
             fused: bool = True) -> ChoicesResult:
    """Accuracy over ``choices``; with ``world`` > 1 each rank scores every world-th record
    and the counts are summed over the ranks (every rank runs as many forwards: ZeRO-3's
    gathers need them all)."""
    from tqdm import tqdm

    mine = choices[rank::world]
    per_rank = -(-len(choices) // world)
    right = right_norm = 0
    with eval_mode(model):
        for i in tqdm(range(per_rank), desc="choices", unit="record", disable=not progress):
            c = mine[i] if i < len(mine) else choices[0]  # a filler forward, not counted
            total, count = ending_losses(model, tokenizer, c, device, max_length, fused)
            if i < len(mine):
                right += int(total.argmin()) == c.label
                right_norm += int((total / count).argmin()) == c.label
    if world > 1:
        import torch.distributed as dist

        sums = torch.tensor([right, right_norm], dtype=torch.float64,
                            device=device or next(model.parameters()).device)
        dist.all_reduce(sums)
        right, right_norm = (int(x) for x in sums.tolist())
    n = len(choices)
    return ChoicesResult(acc=right / n, acc_norm=right_norm / n, examples=n)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
