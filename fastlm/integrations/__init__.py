"""Integrations with other libraries (DeepSpeed, transformers); imported on demand."""
