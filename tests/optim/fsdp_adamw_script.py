"""Run by test_adamw_fsdp.py on 2 gloo ranks: FusedAdamW on FSDP2 (``fully_shard``) parameters,
DTensors sharded on dim 0, beside torch.optim.AdamW on the same model: two param groups (one
without weight decay), the lr changed mid-run, clipping (torch's clip_grad_norm_ against the
optimizer's folded clip), a layer too small to give both ranks a row (one rank holds nothing
of it), and the state saved and loaded through torch.distributed.checkpoint's state-dict API.
Rank 0 writes what it measured as JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastlm.optim import FusedAdamW


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 37), torch.nn.GELU(),
                                torch.nn.Linear(37, 1))  # weight (1, 37): rank 1 holds no row
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def optimizer(cls, model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return cls([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
               lr=1e-2)


def train(model, opt, rank, steps, first=0):
    g = torch.Generator().manual_seed(100 * rank + first)
    norms = []
    for step in range(first, first + steps):
        if step == 4:
            for group in opt.param_groups:
                group["lr"] = 3e-3
        model(torch.randn(16, 24, generator=g)).square().mean().backward()
        if isinstance(opt, FusedAdamW):
            norm = opt.clip_grad_norm_(0.05)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        norms.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
        opt.step()
        opt.zero_grad()
    return norms


def whole(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref, fused = build(), build()
    ref_opt, fused_opt = optimizer(torch.optim.AdamW, ref), optimizer(FusedAdamW, fused)
    ref_norms = train(ref, ref_opt, rank, 8)
    fused_norms = train(fused, fused_opt, rank, 8)
    diff = max((a - b).abs().max().item() for a, b in zip(whole(ref), whole(fused)))
    empty = [None, None]  # per rank: which parameters it holds nothing of
    dist.all_gather_object(empty, [p.to_local().numel() == 0 for p in fused.parameters()])
    state = fused_opt.state[next(iter(fused.parameters()))]
    sharded_state = isinstance(state["exp_avg"], DTensor) and isinstance(state["exp_avg_sq"],
                                                                         DTensor)
    # save through the distributed checkpoint API, load into a fresh model and optimizer:
    # both go on 4 steps and stay equal
    msd, osd = get_model_state_dict(fused), get_optimizer_state_dict(fused, fused_opt)
    again = build()
    again_opt = optimizer(FusedAdamW, again)
    set_model_state_dict(again, msd)
    set_optimizer_state_dict(again, again_opt, osd)
    train(fused, fused_opt, rank, 4, first=8)
    train(again, again_opt, rank, 4, first=8)
    resumed = max((a - b).abs().max().item() for a, b in zip(whole(fused), whole(again)))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"diff": diff, "ref_norms": ref_norms, "fused_norms": fused_norms,
                       "empty": empty, "sharded_state": sharded_state,
                       "resumed_diff": resumed}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
