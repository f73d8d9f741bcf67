"""Run under `deepspeed --num_gpus 2`: the same tiny run under ZeRO 0, 1, 2, 3, ZeRO-2 with
optimizer offload, ZeRO-3 with activation checkpointing, ZeRO-0 in bf16, LoRA under ZeRO 0
and 3, ZeRO-3 sampling at the end; rank 0 writes each run's per-step losses as JSON to argv[2]."""

import json
import sys

from fastlm.train.config import load_config
from fastlm.train.trainer import train

SETTINGS = {"zero0": ["train.zero_stage=0"], "zero1": ["train.zero_stage=1"],
            "zero2": ["train.zero_stage=2"], "zero3": ["train.zero_stage=3"],
            "zero2_offload": ["train.zero_stage=2", "train.offload_optimizer=true"],
            # blocks recomputed in the backward while ZeRO-3 gathers their partitioned weights
            "zero3_ckpt": ["train.zero_stage=3", "train.activation_checkpointing=true"],
            # bf16 without ZeRO: FusedAdamW's masters, DeepSpeed reducing bf16 gradients
            "zero0_bf16": ["train.zero_stage=0", "train.precision=bf16"],
            # LoRA adapters alone trained: frozen weights partitioned too under ZeRO-3
            "zero0_lora": ["train.zero_stage=0", "model.lora.r=4"],
            "zero3_lora": ["train.zero_stage=3", "model.lora.r=4"],
            # every weight partitioned (no small ones kept whole), samples along the run and at
            # the end, the losses unchanged (rank 0 generating alone through ZeRO-3's per-layer
            # gathers failed: they need every rank); multiple-choice accuracy split over ranks
            "zero3_sample": ["train.zero_stage=3", "train.deepspeed={ds}", "sample.tokens=4",
                             "sample.every=2", "eval.choices={mc}"]}


def main(data: str, out: str, overrides: list[str]) -> None:
    results = {}
    ds = out + "_zero3.json"
    with open(ds, "w") as f:
        json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
                  f)
    mc = out + "_choices.jsonl"  # 3 records on 2 ranks: one rank scores a filler, uncounted
    with open(mc, "w") as f:
        for i in range(3):
            f.write(json.dumps({"ctx": f"Topic {i}:", "endings": [" a", " b c"], "label": 0})
                    + "\n")
    for name, extra in SETTINGS.items():
        extra = [e.format(ds=ds, mc=mc) for e in extra]
        cfg = load_config(None, [*overrides, f"data.path={data}", f"out_dir={out}_{name}", *extra])
        state = train(cfg)
        results[name] = [loss for _, loss in state.history]
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out + ".json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2:])
