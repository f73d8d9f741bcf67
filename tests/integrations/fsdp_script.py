"""Run by test_patch_fsdp.py on 2 gloo ranks: a tiny Llama under FSDP2 (``fully_shard``),
fastlm.patch applied before or after the sharding, 3 AdamW steps; rank 0 writes the losses
(each averaged over the ranks) and what the patch swapped as JSON to argv[1]."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

import fastlm


def losses(base, ids, rank, world, order):
    model = copy.deepcopy(base)
    swapped = None

    def patch():
        nonlocal swapped
        model.set_attn_implementation("fastlm")
        swapped = dict(fastlm.patch(model).swapped)

    if order == "patch-then-shard":
        patch()
    if order != "single":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)  # its own unit: the fused loss must see it gathered
        fully_shard(model)
    if order == "shard-then-patch":
        patch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    rows = ids if order == "single" else ids.chunk(world)[rank]
    for _ in range(3):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if order != "single":
            dist.all_reduce(loss)
            loss /= world
        out.append(loss.item())
    return out, swapped


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    conf = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").train()
    ids = torch.randint(0, 128, (2 * world, 17), generator=torch.Generator().manual_seed(1))
    result = {order: losses(base, ids, rank, world, order)
              for order in ("single", "patch-then-shard", "shard-then-patch")}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    # both ranks done before either tears gloo down: a rank destroying the group while the
    # other was still writing aborted now and then ("terminate called without an active
    # exception", one run in four on a 2-core EPYC)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
