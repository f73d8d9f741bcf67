"""fastlm's fused ops. Each has one public function; see its module for the backends."""

from fastlm.ops.attention import attention, attention_varlen

__all__ = ["attention", "attention_varlen"]
