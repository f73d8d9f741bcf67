"""Run under `deepspeed --num_gpus 2` (CPU ranks, gloo): train a tiny model under ZeRO 1/2/3
and ZeRO-2 + CPU offload with FusedAdamW and with torch.optim.AdamW, and tiny transformers
models under ZeRO-3 with and without fastlm.patch; rank 0 writes the losses and what the
optimizer was handed to the JSON file named by the last argument. (One launch serves the
optimizer and the patch tests: each launch costs ~20 s, the first on a machine ~90 s.)"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from fastlm.integrations.deepspeed import fuse_unscale_and_clip, prepare_config  # noqa: E402
from fastlm.optim import FusedAdamW  # noqa: E402

CASES = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.Linear(33, 4))


def train(zero: dict, optimizer_cls, clip: float = 0.0, fuse: bool = False,
          bf16: bool = False) -> tuple[list, dict]:
    net = model()
    opt = optimizer_cls(net.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "gradient_clipping": clip, "steps_per_print": 10**9,
           "bf16": {"enabled": bf16}}
    cfg = prepare_config(cfg, opt)
    if not isinstance(opt, FusedAdamW):  # the reference needs the switches set by hand
        cfg.update(zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    fused_pass = fuse_unscale_and_clip(engine) if fuse else False
    rank = torch.distributed.get_rank()
    losses = []
    for step in range(8):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)
        if bf16:
            x, y = x.bfloat16(), y.bfloat16()
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    handed = {
        "type": type(inner).__name__,
        "numels": [p.numel() for grp in inner.param_groups for p in grp["params"]],
        "devices": sorted({str(p.device) for grp in inner.param_groups for p in grp["params"]}),
        # stage 3 swaps its fp32 sub-groups in only for the step; the state keyed by them stays
        "state_numels": sorted(s["exp_avg"].numel() for s in inner.state.values()),
        "state_devices": sorted({str(s["exp_avg"].device) for s in inner.state.values()}),
        "fused_pass": fused_pass,
        "grad_norm": None if engine.get_global_grad_norm() is None
        else float(engine.get_global_grad_norm()),
    }
    return losses, handed


def hf_zero3(kind: str, patched: bool, partitioned: bool = False) -> dict:
    """A tiny HF causal LM under ZeRO-3 (parameters partitioned across the 2 ranks), trained
    with labels: patched, the fused loss reads the head weight inside the head module's call,
    where ZeRO-3 has gathered it (GPT-2's head weight is tied to the embedding). partitioned:
    built under ``deepspeed.zero.Init`` with transformers told of the ZeRO-3 config, as the HF
    Trainer's ZeRO-3 loads models (its weight init gathers each partition), so the patch sees
    only empty partitions (its probes cannot run; the swaps keep the class match)."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (imported before zero.Init,
    import transformers.models.llama.modeling_llama  # noqa: F401  which breaks imports)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import fastlm

    dims = (dict(n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0) if kind == "gpt2" else
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2))
    ds = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3}}
    conf = AutoConfig.for_model(kind, vocab_size=96, **dims)
    torch.manual_seed(0)
    if partitioned:
        hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers reads it while alive)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            net = AutoModelForCausalLM.from_config(conf, attn_implementation="eager")
        assert all(p.numel() == 0 for p in net.parameters())
    else:
        net = AutoModelForCausalLM.from_config(conf, attn_implementation="eager")
    swapped = dict(fastlm.patch(net).swapped) if patched else {}
    opt = FusedAdamW(net.parameters(), lr=1e-2)
    cfg = prepare_config(ds, opt)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    engine.train()
    rank, losses = torch.distributed.get_rank(), []
    for step in range(4):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(1, 96, (2, 12), generator=g)
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return {"losses": losses, "swapped": swapped, "logits_none": out.logits is None}


def main():
    out = {}
    for kind in ("llama", "gpt2"):
        out[f"zero3_patch_{kind}"] = {"patched": hf_zero3(kind, True),
                                      "eager": hf_zero3(kind, False),
                                      "patched_partitioned": hf_zero3(kind, True, True),
                                      "eager_partitioned": hf_zero3(kind, False, True)}
    for name, zero in CASES.items():
        fused, handed = train(zero, FusedAdamW)
        ref, _ = train(zero, torch.optim.AdamW)
        out[name] = {"fused": fused, "torch": ref, "handed": handed}
    # the unscale+clip pass folded into FusedAdamW's step: the same losses as DeepSpeed's own
    # separate pass (clipping active: lr 1e-2 on this model gives gradient norms above 0.05)
    for name, zero, bf16 in (("zero0_clip", {"stage": 0}, False),
                             ("zero2_clip", {"stage": 2}, False),
                             ("zero1_clip_bf16", {"stage": 1}, True),
                             ("zero2_clip_offload", CASES["zero2_offload"], False)):
        fused, handed = train(zero, FusedAdamW, clip=0.05, fuse=True, bf16=bf16)
        ref, _ = train(zero, FusedAdamW, clip=0.05, fuse=False, bf16=bf16)
        torch_ref, _ = train(zero, torch.optim.AdamW, clip=0.05, bf16=bf16)
        noclip, _ = train(zero, FusedAdamW, clip=0.0, bf16=bf16)
        out[name] = {"fused": fused, "unfused": ref, "torch": torch_ref, "noclip": noclip,
                     "handed": handed}
    out["total_params"] = sum(p.numel() for p in model().parameters())
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[-1], "w") as f:  # the launcher puts --local_rank first
            json.dump(out, f)
    # Join gloo's worker threads now, not during interpreter exit: a worker dropping its last
    # reference to a tensor after finalization began aborts the process (seen with the trainer,
    # which fastlm.train.dist guards the same way).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
