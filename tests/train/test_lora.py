"""LoRA fine-tuning in the trainer (model.lora): only the adapters train, the export folds them
into plain transformers weights that compute what the trained model computed."""

import pytest
import torch

from fastlm.train.config import ConfigError, load_config
from fastlm.train.export import ExportError, export

pytest.importorskip("peft")

TINY = ["data.block_size=32", "optim.warmup_steps=0", "optim.lr=1e-2", "optim.min_lr=1e-2",
        "eval.batches=1", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        "train.micro_batch_size=2", "export=true"]
IDS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", autouse=True)
def _env(launcher_env):
    yield


def _run_capturing(tmp_path, data, *overrides):
    """Train; return (state dict before, state dict after, logits after on IDS) of the model
    the engine trained, and the run directory."""
    from fastlm.train import trainer

    seen = {}
    real_loop = trainer._loop

    def spy(cfg, engine, *a, **k):
        seen["before"] = _gathered_state(engine)
        real_loop(cfg, engine, *a, **k)
        seen["after"] = _gathered_state(engine)
        engine.eval()
        with torch.no_grad():  # the engine's forward gathers ZeRO-3's partitions
            seen["logits"] = engine(input_ids=IDS, use_cache=False).logits.float()
        engine.train()

    trainer._loop = spy
    try:
        cfg = load_config(None, [*TINY, f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                                 *overrides])
        trainer.train(cfg)
    finally:
        trainer._loop = real_loop
    return seen["before"], seen["after"], seen["logits"], tmp_path / "run"


def _gathered_state(engine) -> dict:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _exported_logits(run_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    assert not any("lora" in n for n in hf.state_dict()), "the export is a plain model"
    with torch.no_grad():
        return hf, hf(input_ids=IDS).logits.float()


@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("bf16", 0), ("bf16", 1)])
def test_gpt2_adapters_alone_train_and_the_export_merges_them(tmp_path, tiny_data, capsys,
                                                             precision, stage):
    """GPT-2's Conv1D layers (stored transposed) take adapters too. The export failed in bf16
    without ZeRO (the adapters' fp32 masters sit in FusedAdamW, in a single group) and with
    ZeRO-1 (DeepSpeed's bf16 checkpoint records no frozen weight: the model file has them)."""
    before, after, logits, run_dir = _run_capturing(
        tmp_path, tiny_data, "model.preset=tiny-gpt2",
        "model.overrides={n_layer: 2, n_embd: 64, n_head: 2}", "model.lora.r=4",
        "train.max_steps=4", f"train.precision={precision}", f"train.zero_stage={stage}")
    adapters = [n for n in after if ".lora_" in n]
    assert adapters and all(".lora_" in n or torch.equal(before[n], after[n]) for n in after)
    assert all(after[n].abs().max() > 0 for n in adapters if ".lora_B" in n)  # B starts at 0
    hf, exported = _exported_logits(run_dir)
    # what the trained model computed: to fp32 rounding (fp32 logits ~5: error ~1e-6), or the
    # engine's bf16 rounding against the export's fp32 weights
    atol = 1e-4 if precision == "fp32" else 0.05
    torch.testing.assert_close(exported, logits, rtol=0, atol=atol)
    # ... and not what the base weights computed: the adapters changed the outputs well
    # beyond that tolerance (so an export that dropped them fails)
    base = {n.replace(".base_layer", ""): v for n, v in before.items() if ".lora_" not in n}
    hf.load_state_dict(base, strict=False)
    with torch.no_grad():
        assert (hf(input_ids=IDS).logits - logits).abs().max() > 4 * atol
    assert "model.lora: 8,192 of 141,120 parameters train" in capsys.readouterr().out
    with pytest.raises(ExportError, match="built from the preset 'tiny-gpt2'.*without --adapter"):
        export(run_dir, tmp_path / "adapter", adapter=True)


def test_llama_directory_fine_tunes_with_lora_under_zero3_bf16(tmp_path, tiny_data):
    """The real use: adapters on a pretrained directory, bf16 + ZeRO-3 (frozen weights
    partitioned too). The export keeps the base weights (in bf16, as they trained) and folds
    the adapters into the adapted ones."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "base")
    pretrained = load_file(tmp_path / "base" / "model.safetensors")
    _, after, logits, run_dir = _run_capturing(
        tmp_path, tiny_data, f"model.pretrained={tmp_path / 'base'}", "model.overrides={}",
        "model.lora.target_modules=[q_proj, v_proj, down_proj]", "train.zero_stage=3",
        "train.precision=bf16", "train.max_steps=3")
    assert sum(".lora_" in n for n in after) == 2 * 3 * 2
    hf, exported = _exported_logits(run_dir)
    adapted = ("q_proj", "v_proj", "down_proj")
    for name, w in hf.state_dict().items():
        base = pretrained[name].to(torch.bfloat16).float()
        if name.endswith(tuple(f"{m}.weight" for m in adapted)):
            assert not torch.equal(w, base), name
        else:
            assert torch.equal(w, base), name
    # the engine ran in bf16, the export in fp32 (its merged weights unrounded): bf16 error
    assert (exported - logits).abs().max() <= 0.05 * logits.abs().max()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_directory_whose_vocabulary_the_data_grows_exports(tmp_path, tiny_data, capsys, lora):
    """A pretrained directory with fewer token embeddings than the data's vocabulary (257
    bytes + EOS here) is grown to it; the new rows train (with LoRA too: the embeddings join
    the adapters) and the export holds them (it failed loading the grown checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model("llama", vocab_size=200, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "base")
    before, after, logits, run_dir = _run_capturing(
        tmp_path, tiny_data, f"model.pretrained={tmp_path / 'base'}", "model.overrides={}",
        "train.max_steps=2", *(["model.lora.r=2"] if lora else []))
    emb = "model.embed_tokens.weight"
    assert after[emb].shape[0] == 257 and not torch.equal(before[emb], after[emb])
    hf, exported = _exported_logits(run_dir)
    assert hf.config.vocab_size == 257
    torch.testing.assert_close(exported, logits, rtol=0, atol=1e-4)
    if lora:
        assert "the embeddings too" in capsys.readouterr().out
    why = "trained the embeddings too" if lora else "trained every weight"
    with pytest.raises((ConfigError, ExportError), match=why):
        export(run_dir, tmp_path / "adapter", adapter=True)
    assert not (tmp_path / "adapter").exists()


def test_adapters_export_alone_for_peft_and_transformers(tmp_path, tiny_data, capsys):
    """--adapter writes PEFT's adapter directory: on the pretrained directory it names, PEFT
    and transformers' load_adapter compute what the merged export computes (fp32, ZeRO-2)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastlm.train.export import add_arguments, run

    conf = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "base")
    *_, run_dir = _run_capturing(tmp_path, tiny_data, f"model.pretrained={tmp_path / 'base'}",
                                 "model.overrides={}", "model.lora.r=2", "train.zero_stage=2",
                                 "train.max_steps=2")
    _, merged = _exported_logits(run_dir)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(run_dir), str(tmp_path / "adapter"), "--adapter"])) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    files = {f.name for f in (tmp_path / "adapter").iterdir()}  # + the run's tokenizer
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()

    peft_model = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    hf = base()
    hf.load_adapter(str(tmp_path / "adapter"))
    # fastlm generate / eval take the adapter directory: its base + the adapters, merged
    import warnings

    from fastlm.train.generate import load_model_dir

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours, root = load_model_dir(tmp_path / "adapter")
    assert root == tmp_path / "adapter" and not any("lora" in n for n in ours.state_dict())
    # PEFT's read of transformers' deprecated is_gradient_checkpointing printed a FutureWarning
    assert not any("is_gradient_checkpointing" in str(w.message) for w in seen)
    with torch.no_grad():
        for model in (peft_model, hf, ours.eval()):
            torch.testing.assert_close(model(input_ids=IDS).logits, merged, rtol=0, atol=1e-4)
        assert (base()(input_ids=IDS).logits - merged).abs().max() > 1e-2  # adapters matter


def test_resume_continues_the_adapters_curve(tmp_path, tiny_data):
    from fastlm.train.trainer import train

    args = [*TINY[:-1], f"data.path={tiny_data}", "model.preset=tiny-gpt2",
            "model.overrides={n_layer: 1, n_embd: 32, n_head: 2}", "model.lora.r=2"]
    whole = train(load_config(None, [*args, "train.max_steps=4",
                                     f"out_dir={tmp_path / 'a'}"]))
    train(load_config(None, [*args, "train.max_steps=2", f"out_dir={tmp_path / 'b'}"]))
    resumed = train(load_config(None, [*args, "train.max_steps=4", f"out_dir={tmp_path / 'b'}"]),
                    resume="auto")
    assert [x for _, x in resumed.history[-2:]] == [x for _, x in whole.history[-2:]]


def test_activation_checkpointing_keeps_the_adapters_curve(tmp_path, tiny_data):
    """Blocks recomputed in the backward whose inputs need no gradient (the embeddings are
    frozen) still give the adapters theirs: the curve is the one without checkpointing."""
    from fastlm.train.trainer import train

    args = [*TINY[:-1], f"data.path={tiny_data}", "model.preset=tiny-llama",
            "model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
            "num_attention_heads: 2, num_key_value_heads: 2}", "model.lora.r=2",
            "train.max_steps=3", "log.every=1"]
    curves = [[x for _, x in train(load_config(None, [
        *args, f"train.activation_checkpointing={ckpt}", f"out_dir={tmp_path / str(ckpt)}"]
    )).history] for ckpt in (False, True)]
    assert curves[0] == pytest.approx(curves[1], rel=1e-6)


def test_adapter_directory_without_a_local_base_names_it(tmp_path):
    from fastlm.train.generate import GenerateError, load_model_dir

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "org/model"}')
    with pytest.raises(GenerateError, match="base model 'org/model' is not a local Hugging "
                                            "Face directory.*base_model_name_or_path"):
        load_model_dir(tmp_path)


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    return AutoModelForCausalLM.from_config(conf)


def test_frozen_weights_count_four_flops_a_token_in_mfu():
    """MFU's FLOPs: the forward (2) and the gradient through each weight (2) everywhere, the
    weight's own gradient (2) only where it trains, so LoRA's MFU is not inflated by 6/4."""
    from fastlm.train.config import LoraSettings
    from fastlm.train.lora import apply_lora
    from fastlm.train.model import flops_per_token

    model = _tiny_llama()
    full = flops_per_token(model, 16)
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj"]))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 32 * 2 + 2 * 32  # A and B of the one layer's q_proj
    base = model.num_parameters() - adapters
    assert flops_per_token(model, 16) == full + 6 * adapters - 2 * base


@pytest.mark.parametrize("targets, message", [
    (["qkv"], r"target_modules=\['qkv'\].*linear layers: \[.*'q_proj'"),
    (["q_proj", "lm_head"], "adapts the LM head; leave it out"),
])
def test_bad_targets_name_the_fix(targets, message):
    from fastlm.train.config import LoraSettings
    from fastlm.train.lora import apply_lora

    with pytest.raises(ConfigError, match=message):
        apply_lora(_tiny_llama(), LoraSettings(target_modules=targets))


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=8", "unknown config key 'model.lora.rank'"),
    ("model.lora.r=0", "r must be >= 1"),
    ("model.lora.dropout=1", r"dropout in \[0, 1\)"),
    ("model.lora=3", "model.lora: expected a mapping"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_lora_true_takes_the_defaults_and_null_turns_it_off():
    assert load_config(None, ["model.lora=true"]).model.lora.r == 16
    assert load_config(None, ["model.lora=null"]).model.lora is None
