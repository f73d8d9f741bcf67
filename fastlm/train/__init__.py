"""GPT pretraining and fine-tuning on DeepSpeed: ``fastlm train`` and
``deepspeed --module fastlm.train CONFIG``. Submodules import torch/deepspeed lazily."""

from __future__ import annotations

__all__ = ["train", "load_config", "RunConfig"]


def __getattr__(name: str):
    if name == "train":
        from fastlm.train.trainer import train

        return train
    if name in ("load_config", "RunConfig"):
        from fastlm.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'fastlm.train' has no attribute {name!r}")
