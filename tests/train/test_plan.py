"""fastlm train --dry-run: the plan matches what the run builds, without building it."""

import pytest

from fastlm.train.config import ConfigError, load_config


@pytest.fixture(scope="module", autouse=True)
def _env(launcher_env):
    yield


def test_plan_counts_what_the_trainer_builds(tiny_data):
    from fastlm.data.format import read_meta
    from fastlm.train.model import build_model, flops_per_token
    from fastlm.train.plan import plan

    cfg = load_config(None, [f"data.path={tiny_data}", "model.preset=tiny-llama",
                             "model.lora.r=4", "train.zero_stage=3", "train.precision=bf16",
                             "train.micro_batch_size=3", "train.grad_accum=2",
                             "data.block_size=64", "train.max_steps=10"])
    p = plan(cfg, world=4)
    meta = read_meta(tiny_data)
    model = build_model(cfg.model, meta["vocab_size"], 64, eos_id=meta["eos_id"])
    params = {id(q): q for q in model.parameters()}.values()
    assert p["parameters"] == sum(q.numel() for q in params)
    assert p["trainable"] == sum(q.numel() for q in params if q.requires_grad) < p["parameters"]
    assert p["flops_per_token"] == flops_per_token(model, 64)
    assert (p["global_batch"], p["tokens_per_step"], p["tokens_total"]) == \
        (3 * 2 * 4, 3 * 2 * 4 * 64, 3 * 2 * 4 * 64 * 10)
    assert p["vocab_size"] == 257 and p["zero_stage"] == 3
    assert p["deepspeed"]["train_batch_size"] == 24 and p["deepspeed"]["bf16"]["enabled"]
    mem = p["memory_per_rank"]
    # ZeRO-3 over 4 ranks: bf16 weights split 4 ways; the adapters' fp32 moments + masters
    assert mem["weights"] == p["parameters"] * 2 / 4
    assert mem["optimizer"] == p["trainable"] * 12 / 4


@pytest.mark.parametrize("stage, split", [(0, (1, 1, 1)), (1, (1, 1, 4)), (2, (1, 4, 4)),
                                          (3, (4, 4, 4))])
def test_zero_stages_split_the_model_state(stage, split):
    from fastlm.train.plan import model_state_memory

    m = model_state_memory(1000, 100, "fp32", stage, 4, offload=False)
    whole = (1000 * 4, 100 * 4, 100 * 8)  # fp32: weights, gradients, two moments (no masters)
    assert (m.weights, m.gradients, m.optimizer) == tuple(w / s for w, s in zip(whole, split))


@pytest.mark.parametrize("sets, copy", [([], True), (["model.lora.r=2"], False),
                                        (["train.dpo_loss=simpo"], False),
                                        (["train.dpo_precompute_reference=true"], False)])
def test_dpo_plans_its_reference_copy(tiny_data, sets, copy):
    """DPO without LoRA keeps a whole copy of the starting weights on every rank (ZeRO-3 is
    refused as the run refuses it); LoRA's reference and the reference-free losses cost none."""
    from fastlm.train.plan import plan, render

    base = [f"data.path={tiny_data}", "model.preset=tiny-llama", "train.precision=bf16",
            "train.objective=dpo", *sets]
    cfg = load_config(None, base + ["train.zero_stage=2"])
    p = plan(cfg, world=2)
    assert p["memory_per_rank"]["reference"] == (p["parameters"] * 2 if copy else 0)
    assert ("DPO's reference copy" in render(p, cfg)) == copy
    stage3 = load_config(None, base + ["train.zero_stage=3"])
    if copy:
        with pytest.raises(ConfigError, match="ZeRO-3.*use model.lora.*simpo or orpo"):
            plan(stage3, world=2)
    else:
        assert plan(stage3, world=2)["memory_per_rank"]["reference"] == 0


def _train_command(argv):
    import argparse

    from fastlm.train.cli import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_dry_run_command_prints_the_plan_and_trains_nothing(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    assert _train_command(["--set", f"data.path={tiny_data}", "--set", f"out_dir={out}",
                           "--set", "train.offload_optimizer=true", "--set",
                           "train.zero_stage=2", "--dry-run", "--world-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "x 8 rank(s)" in text and "(in CPU memory: offload)" in text
    assert '"offload_optimizer"' in text and not out.exists()
    with pytest.raises(ConfigError, match="--world-size must be >= 1"):
        _train_command(["--set", f"data.path={tiny_data}", "--dry-run", "--world-size", "0"])
    with pytest.raises(SystemExit, match="--world-size plans a run"):
        _train_command(["--set", f"data.path={tiny_data}", "--world-size", "2"])


def test_a_billion_parameter_plan_allocates_no_weights():
    """The weights live on the meta device: planning Llama 1.4B (5 GiB in fp32) does not
    raise the process's peak memory by anything like that."""
    import resource

    from fastlm.train.plan import plan

    cfg = load_config(None, ["model.preset=llama-1.4b", "data.path=/nonexistent",
                             "data.block_size=2048"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    p = plan(cfg, world=1)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024
    assert p["parameters"] > 1e9 and not p["data_prepared"]
    assert grew < 0.1 * p["parameters"] * 4, grew


def test_every_shipped_run_config_plans():
    """The README's multi-node example: GPT-2 124M on 8 ranks is nanoGPT's 0.5M-token step."""
    from fastlm.train.model import _REPO_CONFIGS
    from fastlm.train.plan import plan

    plans = {p.stem: plan(load_config(p), world=8) for p in sorted(_REPO_CONFIGS.glob("*.yaml"))}
    gpt2 = plans["gpt2-124m"]
    assert (gpt2["micro_batch"], gpt2["grad_accum"], gpt2["tokens_per_step"]) == \
        (16, 4, 512 * 1024)
    assert 124e6 < gpt2["parameters"] < 125e6  # GPT-2 small, its head tied to the embeddings


def test_run_header_says_what_the_run_builds_and_how_often_it_reads_its_data(tiny_data,
                                                                              tmp_path):
    """The lines a run prints as it starts: the model it built (the adapters' share under
    LoRA), and the epochs its steps read of the training split (of each source of a mixture)."""
    import shutil

    from fastlm.data.loader import BlockLoader
    from fastlm.data.mix import MixedLoader
    from fastlm.train.model import build_model
    from fastlm.train.plan import header

    sets = [f"data.path={tiny_data}", "model.preset=tiny-llama", "model.lora.r=4",
            "data.block_size=64", "train.micro_batch_size=3", "train.grad_accum=2",
            "train.max_steps=10"]
    cfg = load_config(None, sets)
    loader = BlockLoader(tiny_data, 64, 3)
    model = build_model(cfg.model, loader.split.vocab_size, 64, eos_id=loader.split.eos_id)
    zero = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    text = header(cfg, model, loader, world=2, micro=3, accum=2, glob=12, ds_config=zero)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"10 steps read {10 * 12 * 64 / loader.tokens_per_epoch:.3g} epochs" in text
    assert f"({trainable / 1e3:.3g} k train: LoRA rank 4)" in text
    assert "x 2 rank(s) = 12 blocks = 768 tokens a step" in text and "ZeRO stage 2" in text
    assert "offloaded to the CPU" in text
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    mix = MixedLoader({str(tiny_data): 3, str(other): 1}, 64, 3)
    text = header(cfg, model, mix, world=2, micro=3, accum=2, glob=12, ds_config={})
    tpe = mix.sources[0].tokens_per_epoch
    assert f"{tiny_data} 0.75 ({10 * 12 * 64 * 0.75 / tpe:.3g} epochs)" in text
    assert f"{other} 0.25 ({10 * 12 * 64 * 0.25 / tpe:.3g} epochs)" in text
