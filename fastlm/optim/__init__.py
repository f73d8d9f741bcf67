"""fastlm optimizers."""

from fastlm.optim.adamw import FusedAdamW

__all__ = ["FusedAdamW"]
