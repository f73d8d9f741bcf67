"""Run by test_patch_tp.py on 2 gloo ranks: a tiny Llama split by transformers' tensor
parallelism (``DistributedConfig(tp_plan="auto")``, with and without sequence parallelism), by
its FSDP (``DistributedConfig(fsdp_size=2)``), and
with the LM head split by torch's own (``parallelize_module``),
attn_implementation="fastlm" and fastlm.patch, against the same checkpoint unsplit and eager
in each process. Rank 0 writes the losses, gradient differences and what the patch swapped and
skipped as JSON to argv[2]."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import fastlm


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: whole(p.grad).detach().clone() for n, p in model.named_parameters()}


def main(path, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.arange(2 * 11).reshape(2, 11) % 128
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").train()
    want_loss, want = step(eager, ids)
    result = {}
    for name, config in (("tp", dict(tp_plan="auto")),
                         ("tp+sp", dict(tp_plan="auto", enable_sequence_parallel=True)),
                         ("fsdp", dict(fsdp_size=2))):
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="fastlm", distributed_config=DistributedConfig(**config))
        model.train()
        handle = fastlm.patch(model)
        loss, grads = step(model, ids)
        err = max((grads[n] - want[n]).abs().max().item() for n in want)
        handle.undo()
        undone_loss, _ = step(model, ids)
        result[name] = {"loss": loss, "want": want_loss, "grad_err": err,
                        "undone_loss": undone_loss, "swapped": dict(handle.swapped),
                        "skipped": dict(handle.skipped)}
    # torch's own tensor parallelism: hooks, not instance forwards; the split head's weight
    # is a DTensor the fused loss cannot take (it ran into "mixed torch.Tensor and DTensor")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastlm").train()
    parallelize_module(model, init_device_mesh("cpu", (2,)),
                       {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    handle = fastlm.patch(model)
    loss, grads = step(model, ids)
    result["torch-tp head"] = {
        "loss": loss, "want": want_loss, "swapped": dict(handle.swapped),
        "grad_err": max((grads[n] - want[n]).abs().max().item() for n in want)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
