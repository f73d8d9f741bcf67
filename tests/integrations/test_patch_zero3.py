"""fastlm.patch under DeepSpeed ZeRO-3 on 2 CPU ranks: a patched tiny Llama and a tied-head
GPT-2 train with the fused loss, rope, norms, MLP and attention, and follow the unpatched
models' losses. The runs come from tests/optim/zero_script.py (one launch for both suites)."""

import pytest


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zero3_training_with_patch_matches_eager(zero_runs, kind):
    run = zero_runs[f"zero3_patch_{kind}"]
    patched, eager = run["patched"], run["eager"]
    assert patched["swapped"].get("loss") == 1 and patched["swapped"].get("attention") == 1
    assert patched["swapped"].get("rope", 0) == (2 if kind == "llama" else 0)
    assert patched["logits_none"]  # the fused loss ran: no logits were materialised
    assert len(patched["losses"]) == 4
    for a, b in zip(patched["losses"], eager["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (patched["losses"], eager["losses"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zero3_patch_of_a_model_built_partitioned(zero_runs, kind):
    """The HF Trainer's ZeRO-3 builds the model under deepspeed.zero.Init: fastlm.patch then
    sees empty partitions (no probe can run on them) and still swaps every kernel, and the
    run follows the unpatched model built the same way."""
    run = zero_runs[f"zero3_patch_{kind}"]
    patched, eager = run["patched_partitioned"], run["eager_partitioned"]
    assert patched["swapped"] == run["patched"]["swapped"]
    assert patched["logits_none"]
    for a, b in zip(patched["losses"], eager["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (patched["losses"], eager["losses"])
