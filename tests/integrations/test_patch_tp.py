"""fastlm with transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``) and
FSDP (``fsdp_size``), and torch's ``parallelize_module``, on 2 CPU ranks (gloo). Tensor
parallelism: the split layers' forwards are transformers' wrappers, set on each instance.
fastlm.patch set the fused LM head's forward over the head's wrapper (and its probe could not
copy the split weights): the patch failed, then the forward met "mixed torch.Tensor and
DTensor". Now the wrapped head keeps its forward (reported in ``skipped``); attention, RoPE,
norms and MLPs run fused on each rank's heads and shards. See tp_script.py."""

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed]


def test_tensor_parallel_llama_patched_matches_eager_unsplit(tmp_path, torchrun):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    results = torchrun(Path(__file__).with_name("tp_script.py"), tmp_path / "llama")
    torch_tp = results.pop("torch-tp head")
    # the head split by torch's parallelize_module: the model's own head and loss run
    assert torch_tp["loss"] == pytest.approx(torch_tp["want"], rel=1e-6)
    assert torch_tp["grad_err"] <= 1e-6
    # transformers' FSDP wraps norms and MLPs themselves, which FSDP2 refuses to deep-copy:
    # the probe's copy raised and the patch failed; not probed now (as ZeRO-3), all fused
    fsdp = results.pop("fsdp")
    assert fsdp["swapped"] == {"rope": 2, "mlp": 2, "norms": 5, "loss": 1}
    for name, r in results.items():
        assert r["swapped"] == {"rope": 2, "mlp": 2, "norms": 5}, name
        assert "tensor parallelism" in r["skipped"]["loss"], name
    for name, r in {**results, "fsdp": fsdp}.items():
        assert r["loss"] == pytest.approx(r["want"], rel=1e-6), name
        assert r["grad_err"] <= 1e-6, name
        assert r["undone_loss"] == pytest.approx(r["want"], rel=1e-6), name
