"""``fastlm bench model``: presets at their real shapes, the choice of implementations, and
Liger-Kernel's place in the run (built and timed after everything else)."""

import json
import sys
import types

import pytest

from fastlm import cli
from fastlm.bench import model as bm
from fastlm.cli import UserError

FAST = ["--seqlens", "9", "--batch", "1", "--repeat", "1", "--min-seconds", "0"]


def test_preset_runs_at_its_own_shape(tmp_path):
    assert cli.main(["bench", "model", "--preset", "tiny-llama", *FAST, "--out",
                     str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "model_tiny-llama_cpu.json").read_text())["rows"]
    assert {(r["model"], r["impl"]) for r in rows} == {("llama", i) for i in bm.IMPLS}
    conf = bm._config("llama", "tiny-llama", 9)
    assert (conf.hidden_size, conf.num_key_value_heads, conf.num_hidden_layers) == (128, 2, 4)


def test_llama_1b_preset_has_llama_3_2_1b_shapes():
    import torch
    from transformers import AutoModelForCausalLM

    conf = bm._config("llama", "llama-1b", 2048)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
    assert 1.2e9 < n < 1.3e9 and conf.head_dim == 64 and conf.vocab_size == 128256


@pytest.mark.parametrize("argv, message", [
    (["--preset", "no-such-preset"], "not found"),
    (["--preset", "tiny-llama", "--model-type", "gpt2"], "drop --model-type"),
    (["--impls", "eager,sdpa"], "choose fastlm"),
    (["--impls", "fastlm,triton"], "unknown"),
    (["--impls", "fastlm,liger"], "GPU kernels"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    assert cli.main(["bench", "model", *argv, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_liger_requested_but_not_installed(monkeypatch):
    monkeypatch.setattr(bm, "_liger_types", lambda: None)
    with pytest.raises(UserError, match="pip install liger-kernel"):
        bm._impls("fastlm,sdpa,liger", "cuda")
    assert bm._impls(None, "cuda") == list(bm.IMPLS)  # by default: left out, no error
    monkeypatch.setattr(bm, "_liger_types", lambda: {"llama"})
    assert bm._impls(None, "cuda") == [*bm.IMPLS, "liger"]
    assert bm._impls(None, "cpu") == list(bm.IMPLS)


def test_liger_is_timed_after_every_other_model(tmp_path, monkeypatch, capsys):
    """Liger patches module-level functions, so its model comes last; a model type it has no
    patch for gets no row (and says so). A stand-in liger package records the calls (the real
    one needs a GPU)."""
    events = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = (
        lambda model: events.append(("apply", model.config.model_type)))
    patch_mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch_mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}
    for name, mod in [("liger_kernel", types.ModuleType("liger_kernel")),
                      ("liger_kernel.transformers", fake),
                      ("liger_kernel.transformers.monkey_patch", patch_mod)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(bm, "_impls", lambda spec, device: [*bm.IMPLS, "liger"])
    timed = bm._time_lengths

    def spy(args, report, kind, s, models, dtype):
        events.append(("time", kind, tuple(models)))
        return timed(args, report, kind, s, models, dtype)

    monkeypatch.setattr(bm, "_time_lengths", spy)
    tiny = {k: dict(bm.SIZES[k], vocab_size=64) for k in ("llama", "gpt2")}
    tiny["llama"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tiny["gpt2"].update(n_embd=32, n_layer=1)
    monkeypatch.setattr(bm, "SIZES", tiny)
    assert cli.main(["bench", "model", "--model-type", "llama,gpt2", *FAST, "--out",
                     str(tmp_path), "--name", "liger"]) == 0
    assert events == [("time", "llama", bm.IMPLS), ("time", "gpt2", bm.IMPLS),
                      ("apply", "llama"), ("time", "llama", ("liger",))]
    assert "no Liger-Kernel patch for model type 'gpt2'" in capsys.readouterr().out
    rows = json.loads((tmp_path / "liger.json").read_text())["rows"]
    liger = [r for r in rows if r["impl"] == "liger"]
    assert [r["model"] for r in liger] == ["llama"] and liger[0]["ms"] > 0
    fastlm_llama = next(r for r in rows if r["impl"] == "fastlm" and r["model"] == "llama")
    assert fastlm_llama["vs_best_peer"] > 0  # liger's row counts among the peers


def test_generation_is_timed_and_tokens_compared(tmp_path, monkeypatch):
    """--generate: greedy generation with the cache per implementation, ms per new token, and
    whether each produced the first implementation's tokens (fp32: all must). BERT cannot
    generate and is left out; alone it is an error, as is a count below 1."""
    tiny = {k: dict(bm.SIZES[k], vocab_size=64) for k in ("llama", "gpt2", "bert")}
    tiny["llama"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    tiny["gpt2"].update(n_embd=32, n_layer=2)
    tiny["bert"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    monkeypatch.setattr(bm, "SIZES", tiny)
    assert cli.main(["bench", "model", "--model-type", "llama,gpt2,bert", "--generate", "5",
                     *FAST, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "model_llama_gpt2_generate_cpu.json").read_text())["rows"]
    assert {(r["model"], r["impl"]) for r in rows} == {(k, i) for k in ("llama", "gpt2")
                                                       for i in bm.IMPLS}
    assert all(r["same_tokens"] and r["new_tokens"] == 5 for r in rows)
    assert all(r["ms_per_token"] == pytest.approx(r["ms"] / 5) for r in rows)
    assert (tmp_path / "model_llama_gpt2_generate_cpu.png").exists()
    with pytest.raises(UserError, match="do not generate"):
        bm.run(_args("bert", 3))
    with pytest.raises(UserError, match=">= 1"):
        bm.run(_args("llama", 0))


def _args(kind, n):
    import argparse

    p = argparse.ArgumentParser()
    bm.add_arguments(p)
    return p.parse_args(["--model-type", kind, "--generate", str(n), *FAST])


def test_packed_rows_time_each_implementation_with_restarting_positions(tmp_path):
    """--packed N: every row packs N sequences (positions restart at each); the rows say so,
    and bert (no packing by position ids) is left out."""
    argv = ["bench", "model", "--model-type", "llama,bert", "--packed", "3", "--seqlens", "12",
            "--batch", "2", "--repeat", "1", "--min-seconds", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "model_llama_packed3_cpu.json").read_text())["rows"]
    assert {(r["model"], r["impl"], r["packed"]) for r in rows} == {
        ("llama", i, 3) for i in bm.IMPLS}
    pos = bm._packed_positions(2, 12, 3, "cpu")
    assert pos.shape == (2, 12) and ((pos == 0).sum(1) == 3).all()
    steps = pos[:, 1:] - pos[:, :-1]
    assert ((steps == 1) | (pos[:, 1:] == 0)).all()


@pytest.mark.parametrize("argv, message", [
    (["--packed", "0"], "between 1 and the shortest"),
    (["--packed", "10"], "between 1 and the shortest"),
    (["--packed", "2", "--generate", "3"], "drop it or --generate"),
    (["--packed", "2", "--model-type", "bert"], "take no packing"),
])
def test_bad_packed_arguments(argv, message, capsys):
    assert cli.main(["bench", "model", *FAST, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["sdpa", "fastlm"])
def test_bf16_model_is_built_as_users_build_it(impl):
    """bf16 weights, but RoPE's inv_freq stays fp32 as transformers builds it (model.to(bf16)
    rounded it: RoPE's angles drift with position)."""
    import torch

    model = bm._model(bm._config("llama", "tiny-llama", 9), impl, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    freqs = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert freqs and all(b.dtype == torch.float32 for b in freqs)


def test_every_bench_config_builds_without_transformers_warnings(transformers_log):
    """Architectures whose default special ids lie past the bench's vocabulary (GPT-2's 50256,
    Phi-3's 32000, ...) had transformers warn at every config: the ids move inside it."""
    for kind in bm.SIZES:
        conf = bm._config(kind, None, 512)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(conf, key, None)
            assert not isinstance(value, int) or value < conf.vocab_size, (kind, key)
    assert not transformers_log, transformers_log
