"""Triton kernels of fastlm, installed as ``fastlm.triton_kernels`` (launchers, no autograd)."""
