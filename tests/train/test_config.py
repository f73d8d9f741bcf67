"""Run config: YAML + overrides, and errors that name the key."""

import pytest

from fastlm.train.config import ConfigError, TrainConfig, load_config, resolve_batch


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train: {max_steps: 10}\noptim: {lr: 3e-4}\n")
    cfg = load_config(p, ["train.precision=bf16", "data.block_size=32", "optim.betas=[0.9, 0.9]"])
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 3e-4  # "3e-4" (a YAML string) -> float
    assert cfg.train.precision == "bf16" and cfg.data.block_size == 32
    assert cfg.optim.betas == [0.9, 0.9]


def test_every_shipped_config_loads():
    from fastlm.train.model import _REPO_CONFIGS

    runs = sorted(_REPO_CONFIGS.glob("*.yaml"))
    assert runs, "configs/*.yaml missing"
    for p in runs:
        load_config(p)


@pytest.mark.parametrize("text, overrides, match", [
    ("train: {max_stpes: 3}", [], r"unknown config key 'train.max_stpes'.*did you mean.*max_steps"),
    ("trian: {}", [], r"unknown config key 'trian'.*'train'"),
    ("train: {max_steps: ten}", [], r"'train.max_steps' must be int or null, got 'ten'"),
    ("train: {max_steps: 1.5}", [], r"'train.max_steps' must be int"),
    ("", ["train.precision=fp8"], r"'train.precision' must be one of"),
    ("", ["train.zero_stage=4"], r"'train.zero_stage' must be one of"),
    ("", ["optim.min_lr=1"], r"optim.min_lr"),
    ("", ["optim.betas=[0.9, 1.0]"], r"optim.betas"),
    ("", ["train.max_steps"], r"expected KEY=VALUE"),
    ("", ["data.block_size=0"], r"'data.block_size' must be >= 1"),
    ("", ["eval.batches=-1"], r"'eval.batches' must be >= 1 \(or 0: no validation\)"),
    ("", ["eval.batches=0", "eval.patience=3"], r"eval.patience runs at validations, which "
                                                r"eval.batches=0 turns off"),
    # taken before, and meaningless: a negative eps or clip, a top_p of 2 for the sample
    ("", ["optim.eps=-1"], r"optim.eps > 0, got 0.1 and -1"),
    ("", ["optim.weight_decay=-0.1"], r"optim.weight_decay must be >= 0"),
    ("", ["train.grad_clip=-1"], r"train.grad_clip must be >= 0 \(0 = no clipping\)"),
    ("", ["sample.top_p=2"], r"sample.top_p must be in \(0, 1\]"),
    ("", ["sample.temperature=-0.5"], r"sample.temperature.*must be >= 0"),
    ("", ["sample.top_k=-1"], r"sample.top_k must be >= 0"),
    ("- a\n- b\n", [], r"top level must be a mapping"),
    ("train: [1, 2]", [], r"train: expected a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("micro, accum, glob, world, expect", [
    (4, 2, None, 2, (4, 2, 16)),
    (None, None, None, 2, (8, 1, 16)),  # the defaults
    (4, None, None, 2, (4, 1, 8)),
    (None, 3, None, 1, (8, 3, 24)),
    (None, 2, 16, 2, (4, 2, 16)),
    (4, None, 16, 2, (4, 2, 16)),
    (4, 2, 16, 2, (4, 2, 16)),
])
def test_batch_triple_derivation(micro, accum, glob, world, expect):
    t = TrainConfig(micro_batch_size=micro, grad_accum=accum, global_batch_size=glob)
    assert resolve_batch(t, world) == expect


@pytest.mark.parametrize("micro, accum, glob, match", [
    (4, 2, 10, "inconsistent batch sizes.*micro_batch_size=4, grad_accum=2, global_batch_size=10"),
    (None, 3, 16, "not a multiple of grad_accum x world_size"),
    (None, None, 16, "global_batch_size alone: give train.micro_batch_size or train.grad_accum"),
    (0, 1, None, "micro_batch_size must be >= 1"),
])
def test_bad_batch_triple_names_all_three(micro, accum, glob, match):
    t = TrainConfig(micro_batch_size=micro, grad_accum=accum, global_batch_size=glob)
    with pytest.raises(ConfigError, match=match):
        resolve_batch(t, 2)


def test_unknown_preset_lists_known():
    from fastlm.train.model import preset_path

    with pytest.raises(ConfigError, match="known presets.*tiny-gpt2"):
        preset_path("gpt5-nano")


@pytest.mark.parametrize("preset, overrides, match", [
    ("tiny-gpt2", {"n_layers": 3}, r"model.overrides: 'n_layers' \(did you mean 'n_layer'\?\) is "
     r"not a key of GPT2Config"),
    ("tiny-gpt2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"'rope_scaling'"),
    ("tiny-llama", {"num_layers": 3, "hiden_size": 8}, r"'num_layers' .*, 'hiden_size' \(did "
     r"you mean 'hidden_size'\?\) are not keys of LlamaConfig"),
])
def test_unknown_model_key_is_an_error(preset, overrides, match):
    """transformers keeps an unknown key as an attribute nothing reads: a typo trained a
    default-sized model, silently."""
    from fastlm.train.config import ModelConfig
    from fastlm.train.model import hf_config

    with pytest.raises(ConfigError, match=match):
        hf_config(ModelConfig(preset=preset, overrides=overrides), 256, 32)


def test_known_model_keys_pass():
    """Keys of the class, aliases in its attribute map, and legacy keys the class converts."""
    from fastlm.train.config import ModelConfig
    from fastlm.train.model import _REPO_CONFIGS, hf_config

    conf = hf_config(ModelConfig(preset="tiny-llama", overrides={
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "num_hidden_layers": 2}), 256, 32)
    assert conf.rope_parameters["factor"] == 2.0 and conf.num_hidden_layers == 2
    conf = hf_config(ModelConfig(preset="tiny-gpt2", overrides={"hidden_size": 32,
                                                                "resid_pdrop": 0.0}), 256, 32)
    assert conf.n_embd == 32 and conf.resid_pdrop == 0.0
    for p in sorted((_REPO_CONFIGS / "models").glob("*.yaml")):  # every shipped preset
        hf_config(ModelConfig(preset=p.stem), None, None)


def test_unknown_key_over_a_pretrained_model(tmp_path):
    """from_pretrained drops a keyword its config lacks, silently; fastlm names it."""
    from transformers import GPT2Config

    from fastlm.train.config import ModelConfig
    from fastlm.train.model import hf_config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"'n_layers' \(did you mean 'n_layer'\?\)"):
        hf_config(ModelConfig(pretrained=str(tmp_path), overrides={"n_layers": 2}), 64, 8)
    conf = hf_config(ModelConfig(pretrained=str(tmp_path), overrides={"resid_pdrop": 0.0}), 64, 8)
    assert conf.resid_pdrop == 0.0 and conf.n_layer == 1


@pytest.mark.parametrize("kind, text", [("gemma3", "gemma3_text"), ("llama4", "llama4_text")])
def test_composite_model_type_in_a_preset_names_its_language_model(tmp_path, kind, text):
    """A vision-language type keeps the vocabulary in a sub-config: the preset's error named
    vocab_size and the token ids (keys the user never wrote); it names the text type now, and
    that type builds."""
    from fastlm.train.config import ModelConfig
    from fastlm.train.model import hf_config

    (tmp_path / "p.yaml").write_text(f"model_type: {kind}\n")
    with pytest.raises(ConfigError, match=rf"composite .* use model_type '{text}'"):
        hf_config(ModelConfig(preset=str(tmp_path / "p.yaml")), 256, 32, eos_id=255)
    (tmp_path / "p.yaml").write_text(f"model_type: {text}\nnum_hidden_layers: 1\n")
    conf = hf_config(ModelConfig(preset=str(tmp_path / "p.yaml")), 256, 32, eos_id=255)
    assert conf.model_type == text and conf.vocab_size == 256
    # an encoder-decoder's config is its own text config (BART builds as a causal LM)
    (tmp_path / "p.yaml").write_text("model_type: bart\n")
    assert hf_config(ModelConfig(preset=str(tmp_path / "p.yaml")), 256, 32).vocab_size == 256


def test_micro_and_global_given_derive_the_accumulation():
    """`--set train.micro_batch_size=2 --set train.global_batch_size=8` (two of three): the
    accumulation's default of 1 counted as given and made the triple inconsistent."""
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert resolve_batch(cfg.train, 2) == (2, 2, 8)
    assert resolve_batch(cfg.train, 1) == (2, 4, 8)  # the same run on fewer ranks
    assert resolve_batch(load_config(None, []).train, 1) == (8, 1, 8)


def _factors(schedule, *extra, steps=11):
    from fastlm.train.engine import lr_lambda

    f = lr_lambda(load_config(None, ["train.max_steps=10", "optim.warmup_steps=2",
                                     "optim.lr=1", "optim.min_lr=0.1",
                                     f"optim.schedule={schedule}", *extra]))
    return [f(i) for i in range(steps)]


# max_steps 10, warmup 2, min_lr / lr = 0.1; values written out from each shape's definition
@pytest.mark.parametrize("schedule, extra, expected", [
    ("cosine", [], {1: 1.0, 2: 1.0, 6: 0.1 + 0.9 * 0.5, 10: 0.1}),  # cos(pi/2) halfway
    ("linear", [], {2: 1.0, 4: 0.1 + 0.9 * 0.75, 6: 0.55, 10: 0.1}),
    ("constant", [], {2: 1.0, 9: 1.0, 10: 1.0}),
    # cooldown: the last 20% (2 steps) from 1 to min_lr, flat at 1 before
    ("wsd", [], {2: 1.0, 8: 1.0, 9: 0.55, 10: 0.1}),
    ("wsd_sqrt", [], {8: 1.0, 9: 0.1 + 0.9 * (1 - 0.5 ** 0.5), 10: 0.1}),
    ("wsd", ["optim.decay_steps=4"], {6: 1.0, 7: 0.1 + 0.9 * 0.75, 8: 0.55, 10: 0.1}),
])
def test_lr_schedules(schedule, extra, expected):
    got = _factors(schedule, *extra)
    assert got[0] == 0.5  # every schedule warms up linearly: (step + 1) / warmup
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=1e-12), (step, got)
    assert all(a >= b for a, b in zip(got[1:], got[2:]))  # never rises after the warmup


@pytest.mark.parametrize("overrides, match", [
    (["optim.schedule=step"], r"'optim.schedule' must be one of \['cosine', 'linear'"),
    (["optim.schedule=wsd", "optim.warmup_steps=5", "optim.decay_steps=8",
      "train.max_steps=10"], r"warmup \(5\) and cooldown \(optim.decay_steps=8\) do not fit"),
    (["optim.decay_steps=0"], "optim.decay_steps >= 1"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
])
def test_bad_schedule_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_run_length_in_epochs_or_steps(tmp_path):
    """train.epochs as HF's num_train_epochs: one of it and train.max_steps; the command line's
    replaces the file's other one; 1000 steps when neither is given."""
    from fastlm.train.config import resolve_epochs

    assert load_config(None).train.max_steps == 1000
    steps = write(tmp_path, "train: {max_steps: 120}\n")
    cfg = load_config(steps, ["train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (2.0, None)
    epochs = tmp_path / "e.yaml"
    epochs.write_text("train: {epochs: 3}\n")
    cfg = load_config(epochs, ["train.max_steps=7"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 7)
    with pytest.raises(ConfigError, match=r"one of train.max_steps \(5\) and train.epochs"):
        load_config(None, ["train.epochs=2", "train.max_steps=5"])
    with pytest.raises(ConfigError, match=r"one of train.max_steps"):
        load_config(write(tmp_path, "train: {max_steps: 5, epochs: 1}\n"))
    with pytest.raises(ConfigError, match=r"'train.epochs' must be > 0"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"train.epochs counts passes over one dataset"):
        load_config(None, ["train.epochs=1", "data.mix={a: 1, b: 1}"])
    # ceil(epochs x samples / global batch): the last step may start the next epoch
    cfg, note = resolve_epochs(load_config(None, ["train.epochs=1.5"]), 113, 16)
    assert (cfg.train.max_steps, cfg.train.epochs) == (11, None)
    assert note == "train.epochs=1.5 -> train.max_steps=11 (113 blocks an epoch, 16 a step)"
    assert resolve_epochs(load_config(None, ["train.epochs=0.001"]), 113, 16)[0].train \
        .max_steps == 1


def test_a_warmup_as_long_as_the_run_is_announced():
    from fastlm.train.engine import lr_lambda, schedule_note

    assert schedule_note(load_config(None, ["train.max_steps=101"])) is None  # warmup 100
    cfg = load_config(None, ["train.max_steps=50"])
    note = schedule_note(cfg)
    assert note.startswith("optim.warmup_steps=100 is not shorter than the run (50 steps)")
    # what it says: the last step's multiplier is 50/100 of optim.lr
    assert "0.5 x optim.lr" in note and lr_lambda(cfg)(49) == 0.5
