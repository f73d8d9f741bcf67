"""fastlm's fused ops. Each has one public function; see its module for the backends."""

from fastlm.ops.activations import geglu, gelu, silu, swiglu
from fastlm.ops.attention import attention, attention_varlen
from fastlm.ops.cross_entropy import fused_linear_cross_entropy
from fastlm.ops.norms import layer_norm, rms_norm
from fastlm.ops.rotary import rotary

__all__ = ["attention", "attention_varlen", "rms_norm", "layer_norm", "gelu", "silu", "swiglu",
           "geglu", "fused_linear_cross_entropy", "rotary"]
