"""The datasheet peaks MFU is reported against, by the names torch gives the GPUs."""

import pytest
import torch

from fastlm.train.peaks import gpu_peak_tflops


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),  # was the bf16 peak: MFU 15x too low
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),  # was the SXM part's
    ("NVIDIA H100 NVL", "fp16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA H200 NVL", "bf16", False, 835.5),
    ("NVIDIA GH200 480GB", "bf16", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5),
    ("NVIDIA A10", "bf16", False, 125.0),
    ("NVIDIA L4", "bf16", False, 121.0),
    ("NVIDIA L40S", "bf16", False, 362.0),  # matched "L4" as a substring: MFU 3x too high
    ("NVIDIA L40", "bf16", False, 181.0),
])
def test_gpus_get_their_own_peak_for_the_runs_precision(name, precision, tf32, peak):
    assert gpu_peak_tflops(name, precision, tf32) == peak


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA B200", "Tesla V100-SXM2-16GB", ""])
def test_a_gpu_outside_the_table_gets_no_peak(name):
    assert gpu_peak_tflops(name, "bf16") is None


def test_the_trainer_reads_the_device_name_and_the_fp32_matmul_setting(monkeypatch):
    from fastlm.train.trainer import _peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA L40S")
    dev = torch.device("cuda", 0)
    assert _peak_flops(dev, "bf16") == 362.0e12
    assert _peak_flops(dev, "fp32") == 91.6e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert _peak_flops(dev, "fp32") == 183.0e12
