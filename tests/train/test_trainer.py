"""The trainer in-process as a world of one: batch arithmetic, evaluation, checkpoints, export."""

import dataclasses
import errno
import json
import math
import subprocess
import sys
import time
import types

import pytest
import torch

from fastlm.train import runlock
from fastlm.train.config import ConfigError, load_config

TINY = ["model.preset=tiny-gpt2", "model.overrides={n_layer: 2, n_embd: 64, n_head: 2}",
        "data.block_size=32", "optim.warmup_steps=2", "eval.batches=2", "log.progress=false",
        "log.tensorboard=false", "checkpoint.every=0"]


@pytest.fixture(scope="module", autouse=True)
def _env(launcher_env):
    yield


def config(tmp_path, data, *overrides):
    return load_config(None, [*TINY, f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                              *overrides])


def run(cfg, **kw):
    from fastlm.train.trainer import train

    return train(cfg, **kw)


def losses(state):
    return [loss for _, loss in state.history]


def test_grad_accumulation_equals_bigger_micro_batch(tmp_path, tiny_data):
    """micro 2 x accum 4 == micro 8 x accum 1 to 1e-6 (fp32): same tokens, same update."""
    a = run(config(tmp_path / "a", tiny_data, "train.micro_batch_size=2", "train.grad_accum=4",
                   "train.max_steps=5", "eval.every=0"))
    b = run(config(tmp_path / "b", tiny_data, "train.micro_batch_size=8", "train.grad_accum=1",
                   "train.max_steps=5", "eval.every=0"))
    la, lb = losses(a), losses(b)
    assert len(la) == 5 and la[-1] < la[0]
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-6 * abs(y), (la, lb)


def test_one_process_skips_the_gradient_allreduce_with_the_same_losses(tmp_path, tiny_data,
                                                                        monkeypatch):
    """A world of one with plain fp32 and no ZeRO has nothing to reduce: the engine's bucketed
    all-reduce is switched off, and the losses equal a run that does it (accumulation on)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import fastlm.train.engine as fengine

    calls = []
    real = DeepSpeedEngine.allreduce_gradients
    monkeypatch.setattr(DeepSpeedEngine, "allreduce_gradients",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    args = ("train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=4",
            "eval.every=0")
    skipped = run(config(tmp_path / "a", tiny_data, *args))
    assert calls == []
    original = fengine.initialize

    def with_allreduce(*a, **k):
        engine, opt, sched = original(*a, **k)
        engine.enable_backward_allreduce = True
        return engine, opt, sched

    import fastlm.train.trainer as ftrainer

    monkeypatch.setattr(ftrainer, "initialize", with_allreduce)
    reduced = run(config(tmp_path / "b", tiny_data, *args))
    assert len(calls) >= 4  # the reference run did reduce
    assert losses(skipped) == losses(reduced)


def test_folded_clip_reports_the_norm_the_trainer_would_measure(tmp_path, tiny_data,
                                                                monkeypatch):
    """fp32 without ZeRO: FusedAdamW's folded clip replaces DeepSpeed's clip pass and its norm
    is the logged one; torch's AdamW keeps DeepSpeed's pass and fastlm measures the norm. The
    first step's gradients are the same in both runs, so are their norms; the clip acts
    (max norm 0.1) and the runs' losses stay together."""
    def norms(name, sub):
        cfg = config(tmp_path / sub, tiny_data, "train.micro_batch_size=2", "train.max_steps=3",
                     "eval.every=0", "log.every=1", "train.grad_clip=0.1", f"optim.name={name}")
        state = run(cfg)
        rows = (tmp_path / sub / "run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["grad_norm"] for r in rows if '"loss"' in r], losses(state)

    import deepspeed.runtime.engine as ds_engine

    ds_clips = []
    ds_clip = ds_engine.clip_grad_norm_
    monkeypatch.setattr(ds_engine, "clip_grad_norm_",
                        lambda *a, **k: ds_clips.append(1) or ds_clip(*a, **k))
    folded, folded_losses = norms("fused_adamw", "fused")
    assert ds_clips == []  # DeepSpeed's own clip pass did not run
    measured, torch_losses = norms("adamw", "torch")
    assert len(ds_clips) == 3
    assert folded[0] == pytest.approx(measured[0], rel=1e-5) and folded[0] > 0.1
    assert folded_losses == pytest.approx(torch_losses, rel=1e-5)


@pytest.mark.parametrize("extra", [["train.precision=fp32"], ["train.precision=bf16"],
                                   ["optim.name=adamw"], ["train.grad_clip=0"]])
def test_a_nonfinite_step_without_zero_is_skipped_as_zero_skips_it(tmp_path, tiny_data,
                                                                   monkeypatch, recwarn, extra):
    """An inf loss at step 3 without ZeRO: the step is skipped (counted, weights and schedule
    unchanged) and the run goes on exactly as ZeRO-1's, which DeepSpeed skips itself; it made
    every weight NaN for the rest of the run (every later loss and eval NaN). FusedAdamW with
    its folded clip (fp32, bf16 masters), torch's AdamW after DeepSpeed's clip, no clip."""
    monkeypatch.setenv("FASTLM_TEST_OVERFLOW_AT_STEP", "3")

    def steps(stage):
        sub = tmp_path / f"z{stage}"
        state = run(config(sub, tiny_data, "train.micro_batch_size=2", "train.max_steps=6",
                           "eval.every=0", "log.every=1", f"train.zero_stage={stage}", *extra))
        rows = [json.loads(r) for r in (sub / "run" / "metrics.jsonl").read_text().splitlines()]
        return losses(state), [r["skipped_steps"] for r in rows if "loss" in r]

    plain, skipped = steps(0)
    assert skipped == [0, 0, 1, 1, 1, 1]
    # the guard wraps the step the scheduler had wrapped: torch does not take it for a rewrite
    assert not [w for w in recwarn if "overridden" in str(w.message)]
    assert not math.isfinite(plain[2]) and all(math.isfinite(x) for x in plain[3:])
    zero, _ = steps(1)
    # bf16: the masters are FusedAdamW's without ZeRO, DeepSpeed's with it (rounded apart)
    assert plain[3:] == pytest.approx(zero[3:], rel=1e-5 if "bf16" in extra[0] else 1e-6)


def test_nonfinite_steps_in_a_row_abort_without_zero(tmp_path, tiny_data, monkeypatch):
    import fastlm.train.trainer as tr

    real = tr._loss
    monkeypatch.setattr(tr, "_loss", lambda *a: real(*a) * float("nan"))
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=10",
                 "eval.every=0", "train.max_consecutive_skips=3")
    with pytest.raises(tr.TrainingAborted, match=r"3 optimizer steps in a row were skipped for "
                                                 r"gradients that are not finite \(NaN or inf\)"
                                                 r"; the run is diverging: lower optim.lr, or"):
        run(cfg)


def test_run_writes_metrics_checkpoints_and_exports(tmp_path, tiny_data):
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=4", "train.max_steps=6",
                 "eval.every=3", "checkpoint.every=2", "checkpoint.keep_last=2", "export=true",
                 "log.every=2", "log.tensorboard=true")
    state = run(cfg)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert {"lr", "tokens_per_s", "mfu"} <= set(train_rows[0])
    assert all(r["grad_norm"] > 0 for r in train_rows)  # fp32 without ZeRO: measured by fastlm
    assert [r["step"] for r in evals] == [3, 6]
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]), rel_tol=1e-6)
    assert any((out / "tensorboard").iterdir())
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000006"
    kept = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    best = (ckpts / "best").read_text()
    assert kept == sorted({"step00000004", "step00000006", best}), kept
    assert state.best_tag == best

    # the export loads in transformers and computes the trained model's logits
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = PreTrainedTokenizerFast.from_pretrained(out / "hf")
    assert len(tok) == hf.config.vocab_size
    # readable by whoever could read a plain directory (mkdtemp's 0700, transformers' 0600
    # weights were the owner's alone)
    from fastlm._fs import umask

    assert {oct(p.stat().st_mode & 0o777) for p in [out / "hf", *(out / "hf").iterdir()]} == \
        {oct(0o777 & ~umask()), oct(0o666 & ~umask())}
    from fastlm.train.export import load_model

    trained, _, _ = load_model(out)
    ids = torch.tensor([tok("Some text to score.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained(ids).logits, rtol=0, atol=0)
    _assert_export_matches_engine(tmp_path, tiny_data)


def _assert_export_matches_engine(tmp_path, data):
    """Exported weights == the weights the engine trained (not just a round trip)."""
    from fastlm.train import trainer

    captured = {}
    real_loop = trainer._loop

    def spy(cfg, engine, *a, **k):
        real_loop(cfg, engine, *a, **k)
        captured.update({k2: v.detach().clone() for k2, v in engine.module.state_dict().items()})

    trainer._loop = spy
    try:
        run(config(tmp_path / "x", data, "train.micro_batch_size=2", "train.max_steps=2",
                   "eval.every=0", "export=true"))
    finally:
        trainer._loop = real_loop
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "run" / "hf")
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(p, captured[name], rtol=0, atol=0, msg=name)


def test_bf16_run(tmp_path, tiny_data):
    state = run(config(tmp_path, tiny_data, "train.precision=bf16", "train.micro_batch_size=4",
                       "train.max_steps=4", "eval.every=0", "train.zero_stage=1"))
    assert all(math.isfinite(x) for x in losses(state))


def test_bf16_without_zero_keeps_the_masters_in_fused_adamw_and_resumes_exactly(
        tmp_path, tiny_data, monkeypatch):
    """bf16 + ZeRO-0 + FusedAdamW: a bf16 model and the fp32 masters in the optimizer, not
    DeepSpeed's bf16 wrapper; the same curve as that wrapper (which a user's DeepSpeed JSON
    configuring bf16 still gets), and a resume continues it bit for bit."""
    import fastlm.train.engine as fengine
    import fastlm.train.trainer as ftrainer
    from fastlm.optim import FusedAdamW

    engines = []
    real = fengine.initialize
    def engine_parts():
        engine = engines[-1]
        return engine, engine.optimizer, {p.dtype for p in engine.module.parameters()}

    monkeypatch.setattr(ftrainer, "initialize", lambda *a, **k: _keep(engines, real(*a, **k)))
    common = ("train.precision=bf16", "train.micro_batch_size=4", "eval.every=0",
              "optim.decay_steps=6", "checkpoint.every=3", "checkpoint.keep_last=2")
    full = run(config(tmp_path / "full", tiny_data, *common, "train.max_steps=6"))
    engine, opt, dtypes = engine_parts()
    assert not engine.bfloat16_enabled() and dtypes == {torch.bfloat16}
    assert isinstance(opt, FusedAdamW)
    assert {st["master"].dtype for st in opt.state.values()} == {torch.float32}
    # the export carries the fp32 masters, not the bf16 parameters
    from fastlm.train.export import load_model

    exported = dict(load_model(tmp_path / "full" / "run")[0].named_parameters())
    for name, p in engine.module.named_parameters():
        torch.testing.assert_close(exported[name], opt.state[p]["master"], rtol=0, atol=0)
    assert any((exported[n] != exported[n].bfloat16().float()).any() for n in exported)
    run(config(tmp_path / "split", tiny_data, *common, "train.max_steps=3"))
    rest = run(config(tmp_path / "split", tiny_data, *common, "train.max_steps=6"), resume="auto")
    assert losses(rest)[-3:] == losses(full)[3:]
    ds_json = tmp_path / "bf16.json"
    ds_json.write_text('{"bf16": {"enabled": true}}')
    wrapped = run(config(tmp_path / "ds", tiny_data, *common, "train.max_steps=6",
                         f"train.deepspeed={ds_json}"))
    assert engine_parts()[0].bfloat16_enabled()
    fp32 = losses(run(config(tmp_path / "fp32", tiny_data, *common[1:], "train.max_steps=6")))
    # bf16 follows the fp32 curve (seen: within 3e-4 relative), at least as closely as
    # DeepSpeed's wrapper does (seen: 8e-3 off by step 6)
    ours_off = [abs(a - b) / b for a, b in zip(losses(full), fp32)]
    theirs_off = [abs(a - b) / b for a, b in zip(losses(wrapped), fp32)]
    assert max(ours_off) < 2e-3 and max(ours_off) <= max(theirs_off), (ours_off, theirs_off)


def test_bf16_buffers_keep_the_dtype_transformers_builds_them_in(tmp_path, tiny_data,
                                                                  monkeypatch):
    """bf16 without ZeRO cast every buffer with model.to(bf16): Llama's rotary inv_freq in
    bf16 put RoPE's cosines ~0.7 off by position 4096 (transformers keeps it fp32). DeepSpeed's
    bf16 engine (ZeRO 1-3) casts no buffer: MiniMax's decay factors stayed fp32 against bf16
    activations and its first forward failed. Each buffer now gets the dtype transformers gives
    it when it builds the model in bf16, and the two paths train the same curve."""
    import fastlm.train.engine as fengine
    import fastlm.train.trainer as ftrainer

    engines = []
    real = fengine.initialize
    monkeypatch.setattr(ftrainer, "initialize", lambda *a, **k: _keep(engines, real(*a, **k)))
    (tmp_path / "minimax.yaml").write_text(
        "model_type: minimax\nhidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 2\n"
        "num_attention_heads: 2\nnum_key_value_heads: 1\nhead_dim: 16\nnum_local_experts: 2\n"
        "num_experts_per_tok: 1\nmax_position_embeddings: 64\n")
    curves = []
    for stage in (0, 1):
        state = run(config(tmp_path / f"z{stage}", tiny_data, "train.precision=bf16",
                           "train.micro_batch_size=2", "train.max_steps=2", "eval.every=0",
                           f"train.zero_stage={stage}", "model.overrides={}",
                           f"model.preset={tmp_path / 'minimax.yaml'}"))
        curves.append(losses(state))
        buffers = dict(engines[-1].module.named_buffers())
        assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
        decay = [b for n, b in buffers.items() if "decay" in n]
        assert decay and all(b.dtype == torch.bfloat16 for b in decay)
        assert {p.dtype for p in engines[-1].module.parameters()} == {torch.bfloat16}
    # fastlm's bf16 path and DeepSpeed's bf16 engine: the same curve within bf16 noise
    assert all(math.isfinite(x) for x in curves[0])
    for a, b in zip(*curves):
        assert abs(a - b) <= 2e-3 * b, curves


def _keep(engines, result):
    engines.append(result[0])
    return result


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma", "avx512f", "avx512_bf16"}, "bf16"),
                                             ({"avx2", "fma", "amx_bf16"}, "bf16"),
                                             ({"avx2", "fma", "avx512f"}, "fp32")])
def test_auto_precision_follows_the_cpus_bf16_instructions(monkeypatch, flags, expected):
    import fastlm._build
    from fastlm.train.engine import resolve_precision

    monkeypatch.setattr(fastlm._build, "cpu_features", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu"))[0] == expected
    assert resolve_precision("fp32", torch.device("cpu")) == ("fp32", "as configured")
    # a V100 or T4 only emulates bf16 (torch's is_bf16_supported() says yes there): fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, gpu_expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16"),
                                     ((7, 5), "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None, c=capability: c)
        assert resolve_precision("auto", torch.device("cuda", 0))[0] == gpu_expected


def test_auto_precision_run_saves_what_it_resolved_and_resume_checks_it(tmp_path, tiny_data,
                                                                        monkeypatch, capsys):
    import yaml

    import fastlm._build

    monkeypatch.setattr(fastlm._build, "cpu_features", lambda: {"avx512f", "avx512_bf16"})
    args = ("train.micro_batch_size=4", "train.max_steps=3", "eval.every=0")
    auto = run(config(tmp_path / "auto", tiny_data, "train.precision=auto", *args))
    assert "train.precision=auto -> bf16 (this CPU has bf16" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "auto" / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"
    # the same run in fp32: bf16's losses follow it to bf16's resolution (8 bits of mantissa)
    ref = run(config(tmp_path / "fp32", tiny_data, "train.precision=fp32", *args))
    assert losses(auto) == pytest.approx(losses(ref), rel=2e-2)
    assert losses(auto) != losses(ref)  # bf16 really ran
    with pytest.raises(ConfigError, match="train.precision: the checkpoint .* was trained in "
                                          "bf16, this run is fp32.*train.precision=bf16"):
        run(config(tmp_path / "auto", tiny_data, "train.precision=fp32",
                   "train.micro_batch_size=4", "train.max_steps=5", "eval.every=0"),
            resume="auto")


def test_early_stopping_with_patience(tmp_path, tiny_data):
    # lr 1e-12: validation loss cannot improve, so patience 2 stops at the 3rd evaluation
    state = run(config(tmp_path, tiny_data, "optim.lr=1e-12", "optim.min_lr=0",
                       "train.micro_batch_size=2", "train.max_steps=50", "eval.every=1",
                       "eval.patience=2"))
    assert state.step == 3
    # the best checkpoint (the first evaluation's) is what checkpoints/best names for export,
    # generate and eval, while the run directory means the latest
    from fastlm.train.export import export

    ckpts = tmp_path / "run" / "checkpoints"
    assert state.best_tag == "step00000001" and (ckpts / "latest").read_text() != state.best_tag
    out = export(ckpts / "best", tmp_path / "best_hf")
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="--resume .*best.*not a complete checkpoint"):
        (ckpts / "best").write_text("step00000099")
        run(config(tmp_path, tiny_data, "train.max_steps=50"), resume=str(ckpts / "best"))


def test_resume_refused_without_flag_and_bad_inputs(tmp_path, tiny_data):
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=1",
                 "eval.every=0")
    run(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume auto"):
        run(cfg)
    with pytest.raises(ConfigError, match="not a prepared dataset.*fastlm prepare"):
        run(config(tmp_path / "m", tmp_path / "missing", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run(config(tmp_path / "h", tiny_data, "train.precision=fp16"))
    with pytest.raises(ConfigError, match=r"--resume .*step_2: no checkpoint found"):
        run(cfg, resume=str(tmp_path / "run" / "checkpoints" / "step_2"))


def test_a_second_run_on_a_run_dir_in_use_stops_before_touching_it(tmp_path, tiny_data):
    """A run directory another run holds (the same job submitted twice, a requeued job while
    the old one runs): --resume auto continued from the other run's checkpoints and both wrote
    checkpoints, metrics and `latest` into one directory. It stops, naming the holder, with
    nothing in the directory changed; once the holder is gone (killed: the kernel lets go of
    its lock), the same command resumes."""
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=2",
                 "eval.every=0", "checkpoint.every=1")
    run(cfg)  # and its lock let go when train() returned: the runs below take it again
    out = tmp_path / "run"
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")
              if p.name != runlock.LOCK_NAME}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fastlm.train.runlock import _try_lock; f, _ = _try_lock(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4))
        with pytest.raises(ConfigError, match=rf"in use by another fastlm run by pid "
                                              rf"{holder.pid} on .*choose another out_dir"):
            run(more, resume="auto")
        after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")
                 if p.name != runlock.LOCK_NAME}
        assert after == before
    finally:
        holder.kill()
        holder.wait()
    assert losses(run(more, resume="auto"))[-1] is not None
    assert (out / "checkpoints" / "step00000004").is_dir()


def test_resuming_a_damaged_checkpoint_names_the_file_and_the_one_before(tmp_path, tiny_data):
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=2",
                 "eval.every=0", "checkpoint.every=1")
    run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    model = ckpts / "step00000002" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])  # a copy cut short
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3))
    with pytest.raises(ConfigError, match=rf"checkpoint {ckpts}/step00000002 is damaged: "
                                          rf"mp_rank_00_model_states.pt is not a whole torch "
                                          rf"file .*--resume {ckpts}/step00000001"):
        run(more, resume="auto")
    from fastlm.train.export import ExportError, load_model

    with pytest.raises(ExportError, match="step00000002 is damaged: mp_rank_00_model_states"):
        load_model(tmp_path / "run")  # what export, generate and eval read a checkpoint with
    assert run(more, resume=str(ckpts / "step00000001")).step == 3


def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path, tiny_data, capsys):
    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=2",
                 "eval.every=0", "checkpoint.every=1")
    run(cfg)
    capsys.readouterr()
    fewer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1))
    for again in (cfg, fewer):  # a requeued job after the end; a max_steps below the step
        assert run(again, resume="auto").step == 2
        out = capsys.readouterr().out
        assert (f"resumed at step 2, train.max_steps is {again.train.max_steps}: nothing left "
                f"to train (set train.max_steps above 2 to go on)") in out


def test_an_unwritable_run_dir_is_named_and_a_filesystem_without_locks_runs_warned(
        tmp_path, tiny_data, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"out_dir '.*file/run' cannot be written .*choose a "
                                          r"directory this user can write"):
        run(config(tmp_path / "file", tiny_data, "train.max_steps=1", "eval.every=0"))

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    state = run(config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=1",
                       "eval.every=0"))
    assert state.step == 1
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_progress_bar_shows_the_gradient_norm_and_loss_scale(tmp_path, tiny_data, monkeypatch):
    """The console's progress: loss, lr, tokens/s, MFU, the gradient norm and (fp16) the loss
    scale, as the metrics file has them (the bar showed the first four alone)."""
    from fastlm.train import trainer
    from fastlm.train.metrics import MetricsLog

    shown = []
    monkeypatch.setattr(MetricsLog, "progress", lambda self, step, postfix: shown.append(postfix))
    run(config(tmp_path, tiny_data, "train.max_steps=2", "log.every=1", "eval.every=0",
               "train.micro_batch_size=2"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines() if '"loss"' in x]
    assert len(shown) == 2 and all(p["gnorm"] == format(r["grad_norm"], ".3g") and
                                   p["loss"] == f"{r['loss']:.4f}" and p["scale"] is None
                                   for p, r in zip(shown, rows))
    fp16 = trainer._postfix({"loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.5, "mfu": 0.5,
                             "grad_norm": 0.123456, "loss_scale": 32768.0, "reward_acc": 0.75})
    assert fp16 == {"loss": "2.5000", "lr": "1.00e-03", "tok/s": "1,234", "mfu": "50.0%",
                    "gnorm": "0.123", "scale": "32768", "acc": "0.75"}


def test_a_validation_split_shorter_than_a_block_names_how_it_was_prepared(tmp_path):
    """A small fine-tuning set at the default --val-fraction (0.01) keeps one short document
    for validation: the error says so and names the option that gives it more."""
    from fastlm.data import prepare

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document number {i} is short."}) + "\n"
                           for i in range(40)))
    data = prepare([src], tmp_path / "data", tokenizer="byte", progress=False)
    with pytest.raises(ConfigError, match=r"validation split .* fewer than block_size\+1 .*"
                       r"larger --val-fraction: it was 0.01, 1 document; or train without "
                       r"validation: eval.batches=0\)"):
        run(config(tmp_path, data, "data.block_size=64", "train.max_steps=1"))
    # which trains (no validation at the end either, so no best checkpoint)
    state = run(config(tmp_path, data, "data.block_size=64", "train.max_steps=2",
                       "train.micro_batch_size=2", "eval.batches=0"))
    assert state.step == 2 and state.best_tag is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows and not any("val_loss" in r for r in rows)


def test_user_deepspeed_json_passes_through_and_is_checked(tmp_path, tiny_data):
    from fastlm.train.engine import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False},
                              "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 4}))
    cfg = config(tmp_path, tiny_data, f"train.deepspeed={ds}", "train.micro_batch_size=4")
    out = deepspeed_config(cfg, 4, 1, 4)
    assert out["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert out["gradient_clipping"] == 0.5 and out["train_batch_size"] == 4
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 disagrees"):
        deepspeed_config(cfg, 8, 1, 8)


def test_loss_counts_only_unmasked_targets():
    """SFT: prompt positions carry IGNORE_INDEX and contribute nothing to loss or gradient."""
    from types import SimpleNamespace

    from fastlm.data.loader import IGNORE_INDEX, Batch
    from fastlm.train.trainer import _loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    engine = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    loss = _loss(engine, Batch(torch.zeros(2, 5, dtype=torch.long), targets), None)
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, :3].abs().max() == 0


def test_sft_and_continued_pretraining_from_an_export(tmp_path, tiny_data):
    """Fine-tune an exported model on prompt/response data (loss on responses only)."""
    from fastlm.data.format import write_split

    base = config(tmp_path / "base", tiny_data, "train.micro_batch_size=4", "train.max_steps=8",
                  "eval.every=0", "export=true")
    run(base)
    hf_dir = tmp_path / "base" / "run" / "hf"
    sft = tmp_path / "sft"
    sft.mkdir()
    import shutil

    shutil.copytree(tiny_data / "tokenizer", sft / "tokenizer")
    meta = json.loads((tiny_data / "meta.json").read_text())
    docs, masks = [], []
    for i in range(40):  # prompt "q<i>?" -> response "a<i>." then EOS (id 256)
        prompt, response = list(f"q{i}?".encode()), list(f"a{i}.".encode()) + [256]
        docs.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    meta["sft"] = True
    meta["splits"] = {"train": write_split(sft, "train", docs, masks=masks),
                      "val": write_split(sft, "val", docs[:8], masks=masks[:8])}
    (sft / "meta.json").write_text(json.dumps(meta))
    cfg = config(tmp_path / "ft", sft, f"model.pretrained={hf_dir}", "data.block_size=16",
                 "train.micro_batch_size=4", "train.max_steps=3", "eval.every=0")
    state = run(cfg)
    assert len(state.history) == 3 and all(math.isfinite(x) for x in losses(state))




def test_chat_fine_tuning_then_generate_chat(tmp_path, capsys, monkeypatch):
    """The chat journey: conversations prepared with an instruct tokenizer's own template
    (ChatML here; its end of turn is not EOS), a model fine-tuned on them, and
    `fastlm generate --chat` laying the prompt out the same way and stopping at the end of
    the turn: greedy, the memorised answer comes back exactly, nothing after it."""
    from fastlm.cli import main
    from fastlm.data import prepare
    from fastlm.data.tokenizer import byte_level

    tok = byte_level(tmp_path / "byte")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok.save_pretrained(tmp_path / "instruct")
    pairs = {"Hi?": "Hey.", "Bye?": "Ciao!"}  # no letter twice: a tiny model learns them fast
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "n": i} for i in range(20) for q, a in pairs.items()]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare([tmp_path / "chat.jsonl"], tmp_path / "data",
                   tokenizer=str(tmp_path / "instruct"), sft=True, val_fraction=0.05, split="tail",
                   dedup=False, progress=False)
    cfg = config(tmp_path, data, "train.micro_batch_size=8", "train.max_steps=150",
                 "optim.lr=3e-3", "eval.every=0", "data.boundaries=true", "export=true",
                 "sample.tokens=20", "sample.prompt=Hi?", "sample.temperature=0")
    run(cfg)  # its sample at the end is a chat reply too (data prepared with --sft)
    assert "--- sample (chat) ---\nuser: Hi?\nassistant: Hey.\n---" in capsys.readouterr().out
    from transformers import AutoTokenizer  # the export chats in the same layout

    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "hf").chat_template == \
        tok.chat_template
    for q, a in pairs.items():
        assert main(["generate", str(tmp_path / "run"), "--chat", "--prompt", q,
                     "--temperature", "0", "--max-new-tokens", "40"]) == 0
        assert capsys.readouterr().out == a + "\n"
    # --interactive: a conversation on stdin, each reply after the history so far
    import io

    from fastlm.train import generate

    calls, real = [], generate.sample

    def recording(model, tok, prompt, **kw):
        calls.append((prompt, [dict(m) for m in kw["history"]]))
        return real(model, tok, prompt, **kw)

    monkeypatch.setattr(generate, "sample", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi?\nBye?\n/reset\n\nHi?\n"))
    assert main(["generate", str(tmp_path / "run"), "--chat", "--interactive",
                 "--temperature", "0", "--max-new-tokens", "40"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 3 and replies[0] == replies[2] == "Hey."
    turn = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey."}]
    assert calls == [("Hi?", []), ("Bye?", turn), ("Hi?", [])]
    assert main(["generate", str(tmp_path / "run"), "--system", "Be brief."]) == 2  # --chat
    # --prompts: the questions in one batch (left-padded, each ended at its own end of turn)
    (tmp_path / "questions.txt").write_text("".join(q + "\n" for q in pairs))
    assert main(["generate", str(tmp_path / "run"), "--chat", "--prompts",
                 str(tmp_path / "questions.txt"), "--out", str(tmp_path / "answers.jsonl"),
                 "--temperature", "0", "--max-new-tokens", "40"]) == 0
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert {r["prompt"]: r["completion"] for r in answers} == pairs


def test_fine_tuning_data_from_another_tokenizer_is_refused(tmp_path, tiny_data):
    """model.pretrained with its tokenizer, data tokenized by another (char-level here): the
    ids would mean other tokens to the model, so the run stops before training and says how
    to prepare the data. The model's own tokenizer passes (the SFT test above)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from fastlm.data.tokenizer import byte_level, char_level

    conf = AutoConfig.for_model("gpt2", vocab_size=300, n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "base")
    byte_level(tmp_path / "base")  # the model's tokenizer: byte-level, as the data's
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "tokenizer")
    char_level(["the quick brown fox"], data / "tokenizer")
    cfg = config(tmp_path, data, f"model.pretrained={tmp_path / 'base'}", "model.overrides={}",
                 "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"tokenized with another vocabulary than "
                                          r"model.pretrained .*--tokenizer"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind, scale", [("granite", dict(logits_scaling=4.0)),
                                         ("cohere", dict(logit_scale=0.25))])
def test_fused_loss_includes_the_models_logit_scale(tmp_path, tiny_data, kind, scale):
    """Granite divides its logits by logits_scaling and Cohere multiplies them by logit_scale
    before the loss: train.fused_loss (the default) trains on the same losses as the full
    logits (it left the scale out: another loss, silently)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(kind, vocab_size=300, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, pad_token_id=0, **scale)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / kind)
    args = (f"model.pretrained={tmp_path / kind}", "model.overrides={}", "train.max_steps=2",
            "eval.every=2", "train.micro_batch_size=2")
    fused = run(config(tmp_path / "f", tiny_data, *args))
    full = run(config(tmp_path / "u", tiny_data, *args, "train.fused_loss=false"))
    for a, b in zip(losses(fused) + [fused.best_val], losses(full) + [full.best_val]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(fused), losses(full))


def test_fine_tunes_and_exports_a_gemma2_directory(tmp_path, tiny_data):
    """A pretrained directory of a model that transformers runs without SDPA (Gemma 2, with
    final-logit soft-capping: the patch's fused loss applies the cap) fine-tunes, and its export
    loads (the export asked for SDPA and failed there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(
        "gemma2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
        final_logit_softcapping=5.0, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "g2")
    state = run(config(tmp_path, tiny_data, f"model.pretrained={tmp_path / 'g2'}",
                       "model.overrides={}", "train.micro_batch_size=2", "train.max_steps=3",
                       "eval.every=3", "export=true"))
    assert len(state.history) == 3 and all(math.isfinite(x) for x in losses(state))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert hf.config.model_type == "gemma2" and hf.config.final_logit_softcapping == 5.0


def test_fine_tunes_a_vision_language_directory(tmp_path, tiny_data):
    """Gemma 3 from 4B up (also Llama 4, Qwen3.5) is a vision-language checkpoint: its sizes
    sit in ``text_config`` and the top level has no num_hidden_layers. Fine-tuning one on text
    crashed on the FLOP count; it trains (MFU counted from the language model's sizes), samples
    and exports a directory of the same class."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from fastlm.train.model import flops_per_token

    conf = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, sliding_window=8, max_position_embeddings=128,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(conf)
    base.save_pretrained(tmp_path / "g3")
    n = sum(p.numel() for n, p in base.named_parameters() if "vision" not in n
            and "multi_modal" not in n)  # the tower does no work on text
    # attention: 12 d T a layer, the sliding one's T its window of 8
    assert flops_per_token(base, 16) == 6.0 * n + 12.0 * 32 * (8 + 16)
    state = run(config(tmp_path, tiny_data, f"model.pretrained={tmp_path / 'g3'}",
                       "model.overrides={}", "train.micro_batch_size=2", "train.max_steps=3",
                       "eval.every=3", "sample.tokens=4", "export=true"))
    assert len(state.history) == 3 and all(math.isfinite(x) for x in losses(state))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(r["mfu"] > 0 for r in rows if "mfu" in r)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert type(hf) is type(base)
    trained = dict(hf.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in base.named_parameters())


def test_fine_tunes_a_vision_language_class_outside_the_causal_auto_class(tmp_path, tiny_data):
    """LLaVA (like Qwen2.5-VL, Mistral Small 3.1, PaliGemma) is not in AutoModelForCausalLM's
    mapping: fine-tuning one on text failed with transformers' "Unrecognized configuration
    class". It is built with AutoModelForImageTextToText, trains on fastlm's kernels to the
    eager losses, exports a directory of its class, and `fastlm generate`/`eval` load it."""
    from transformers import AutoModelForImageTextToText, LlavaConfig

    from fastlm.train.generate import load_model_dir

    conf = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8, projection_dim=32),
        image_token_id=299)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(conf).save_pretrained(tmp_path / "llava")
    args = (f"model.pretrained={tmp_path / 'llava'}", "model.overrides={}",
            "train.micro_batch_size=2", "train.max_steps=2", "eval.every=2")
    fast = run(config(tmp_path, tiny_data, *args, "export=true"))
    eager = run(config(tmp_path / "e", tiny_data, *args, "model.attn_implementation=eager",
                       "model.patch=false"))
    for a, b in zip(losses(fast), losses(eager)):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(fast), losses(eager))
    model, _ = load_model_dir(tmp_path / "run" / "hf")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_model_with_a_fixed_attention_table_trains_announced(tmp_path, tiny_data, caplog):
    """GIT builds its attention from a table of classes keyed by name: asked for
    attn_implementation="fastlm" it failed with KeyError('fastlm'). It trains on transformers'
    default attention, with a warning, and gives that run's losses."""
    from transformers import AutoModelForCausalLM, GitConfig

    from fastlm.train.model import _attn_choices

    conf = GitConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8))
    assert _attn_choices(conf, "fastlm") == ["fastlm", None]  # no text sub-config: GIT is one
    assert _attn_choices(conf, "sdpa") == ["sdpa"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "git")
    args = (f"model.pretrained={tmp_path / 'git'}", "model.overrides={}", "model.patch=false",
            "train.micro_batch_size=2", "train.max_steps=2", "eval.every=2")
    with caplog.at_level("WARNING", logger="fastlm"):
        fast = run(config(tmp_path / "f", tiny_data, *args))
    assert "fastlm's attention runs nowhere in it" in caplog.text
    plain = run(config(tmp_path / "p", tiny_data, *args, "model.attn_implementation=eager"))
    assert losses(fast) == losses(plain)
    # from scratch: the failed first build drew random numbers, and the model it then built
    # had other initial weights than the same seed gives
    from fastlm.train.config import ModelConfig
    from fastlm.train.model import build_model

    (tmp_path / "git.yaml").write_text(
        "model_type: git\nhidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\n"
        "num_attention_heads: 2\nmax_position_embeddings: 64\n")
    built = {}
    for impl in ("fastlm", "eager"):
        torch.manual_seed(0)
        built[impl] = build_model(ModelConfig(preset=str(tmp_path / "git.yaml"), patch=False,
                                              attn_implementation=impl), 300, 32).state_dict()
    for k, v in built["eager"].items():
        assert torch.equal(built["fastlm"][k], v), k


def test_pretrained_directory_without_a_causal_head_is_refused(tmp_path, tiny_data):
    """A T5 directory (encoder-decoder) has no class in AutoModelForCausalLM or
    AutoModelForImageTextToText: the error names the type, what it is and what fastlm trains,
    before anything is written."""
    from transformers import T5Config, T5ForConditionalGeneration

    conf = T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(conf).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match=r"model_type 't5' \(T5Config\) has no causal "
                       r".*it is an encoder-decoder model; fastlm trains causal"):
        run(config(tmp_path, tiny_data, f"model.pretrained={tmp_path / 't5'}",
                   "model.overrides={}", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()


def test_untied_llama_preset_learns_its_eos_input_embedding(tmp_path, tiny_data):
    """Presets set the data's EOS as PAD too; Llama's embedding takes PAD as padding_idx (a row
    zeroed at init and never given a gradient), so an untied Llama (llama-760m, llama-1.4b)
    never learned the input embedding of EOS, the token that starts every document. PAD stays
    unset where the config has none (batched generation pads with EOS, also in the export);
    OPT, whose config has a PAD of 1 (a real byte here), keeps EOS as PAD."""
    from transformers import AutoModelForCausalLM

    from fastlm.train.config import ModelConfig
    from fastlm.train.model import build_model, hf_config

    eos = json.loads((tiny_data / "meta.json").read_text())["eos_id"]
    untied = "model.overrides={tie_word_embeddings: false}"
    state = run(config(tmp_path, tiny_data, "model.preset=tiny-llama", untied,
                       "train.max_steps=2", "eval.every=2", "export=true"))
    assert all(math.isfinite(x) for x in losses(state))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert hf.config.pad_token_id is None and hf.generation_config.pad_token_id == eos
    assert hf.get_input_embeddings().weight[eos].abs().max() > 0
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-llama", overrides={"tie_word_embeddings": False}),
                        300, 32, eos_id=eos)
    ids = torch.full((1, 8), eos)
    model(ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad[eos].abs().max() > 0
    (tmp_path / "opt.yaml").write_text("model_type: opt\nhidden_size: 32\nffn_dim: 64\n"
                                       "num_hidden_layers: 1\nnum_attention_heads: 2\n")
    assert hf_config(ModelConfig(preset=str(tmp_path / "opt.yaml")), 300, 32, eos) \
        .pad_token_id == eos


@pytest.mark.parametrize("preset", [
    "model_type: xglm\nd_model: 32\nffn_dim: 64\nnum_layers: 1\nattention_heads: 2\n",
    "model_type: roberta\nhidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\n"
    "num_attention_heads: 2\nis_decoder: true\n",
])
def test_models_numbering_positions_from_pad_train_from_a_preset(tmp_path, tiny_data, preset):
    """XGLM and RoBERTa's family count positions from the PAD id on; with the data's EOS (256)
    as PAD their position table was too short (RoBERTa: an assertion at build; XGLM: an
    IndexError in the first forward). The table grows to PAD + block + 1, and training runs
    on fastlm's kernels to eager's losses."""
    (tmp_path / "p.yaml").write_text(preset + "max_position_embeddings: 64\n")
    args = (f"model.preset={tmp_path / 'p.yaml'}", "model.overrides={}", "train.max_steps=2",
            "eval.every=2")
    fast = run(config(tmp_path / "f", tiny_data, *args))
    eager = run(config(tmp_path / "e", tiny_data, *args, "model.attn_implementation=eager",
                       "model.patch=false"))
    for a, b in zip(losses(fast), losses(eager)):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(fast), losses(eager))


@pytest.mark.parametrize("kind, sizes, expected", [
    # PaLM's 12 L d T where heads of one dim make up the width
    ("gpt2", dict(n_embd=64, n_layer=2, n_head=4), 12 * 2 * 64 * 32),
    # Gemma 2: heads twice the width (6 T H (Dqk + Dv)); the sliding layer sees 8 keys
    ("gemma2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8),
     6 * 4 * 64 * (8 + 32)),
    # Qwen3-Next: three linear-attention layers have no T x T scores
    ("qwen3_next", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16),
     6 * 4 * 32 * 32),
    # DeepSeek-V3's latent attention: queries/keys of 8 + 8, values of 8 (head_dim is rope's)
    ("deepseek_v3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=8, kv_lora_rank=16, q_lora_rank=32), 2 * 6 * 4 * 24 * 32),
])
def test_attention_flops_follow_each_layers_shape(kind, sizes, expected):
    """The MFU's attention term counted 12 L d T from the width alone: Gemma's wider heads,
    sliding windows, linear-attention layers and latent attention's head dims were wrong."""
    from transformers import AutoConfig

    from fastlm.train.model import _attention_flops

    conf = AutoConfig.for_model(kind, **sizes)
    width = getattr(conf, "hidden_size", None) or conf.n_embd
    assert _attention_flops(conf, width, 32) == expected


def test_composite_config_offers_fastlm_attention_to_its_language_model():
    from transformers import Gemma3Config

    from fastlm.train.model import _attn_choices

    conf = Gemma3Config()
    assert _attn_choices(conf, "fastlm") == ["fastlm", {"text_config": "fastlm"}, None]


def test_fused_loss_follows_the_plain_loss(tmp_path, tiny_data):
    """The chunked LM head + cross-entropy gives the plain path's losses (fp32, 5 steps)."""
    common = ["train.micro_batch_size=4", "train.max_steps=5", "eval.every=5"]
    fused = run(config(tmp_path / "f", tiny_data, *common, "train.fused_loss=true"))
    plain = run(config(tmp_path / "p", tiny_data, *common, "train.fused_loss=false"))
    for a, b in zip(losses(fused), losses(plain)):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(fused), losses(plain))
    assert abs(fused.best_val - plain.best_val) <= 1e-5 * plain.best_val


def test_grouped_evaluation_equals_batch_by_batch(tmp_path, tiny_data, monkeypatch):
    """Evaluation runs small batches through the model several at a time (fused loss): the
    validation loss equals running them one by one, an uneven last group included."""
    import fastlm.train.trainer as trainer

    calls = []
    real = trainer._loss
    monkeypatch.setattr(trainer, "_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["train.micro_batch_size=2", "train.max_steps=1", "eval.every=1",
              "eval.batches=5", "train.fused_loss=true"]
    monkeypatch.setattr(trainer, "_EVAL_GROUP_TOKENS", 2 * 2 * 32)  # groups of 2, 2 and 1
    grouped = run(config(tmp_path / "g", tiny_data, *common))
    assert len(calls) == 2  # the training step and the last group's single batch
    calls.clear()
    monkeypatch.setattr(trainer, "_EVAL_GROUP_TOKENS", 1)
    single = run(config(tmp_path / "s", tiny_data, *common))
    assert len(calls) == 6
    assert abs(grouped.best_val - single.best_val) <= 1e-6 * single.best_val


def test_the_loop_runs_collecting_with_the_startup_frozen(tmp_path, tiny_data, monkeypatch):
    """The CLI pauses the collector while it starts; the trainer resumes it for its loop with
    what exists then frozen, and unfreezes after (fastlm/_gc.py)."""
    import gc

    import fastlm.train.trainer as trainer
    from fastlm import _gc

    seen = []
    real = trainer._loop
    monkeypatch.setattr(trainer, "_loop", lambda *a, **k: seen.append(
        (gc.isenabled(), gc.get_freeze_count() > 0)) or real(*a, **k))
    _gc.pause()
    try:
        run(config(tmp_path, tiny_data, "train.max_steps=1", "eval.every=0"))
    finally:
        _gc.resume()
    assert seen == [(True, True)]
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_export_refuses_optimizer_masters_that_do_not_fit_the_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastlm.train.export import ExportError, _optimizer_masters
    from fastlm.train.model import param_groups

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                       n_positions=8))
    run = {"optim": {"weight_decay": 0.1}}
    groups = param_groups(model, 0.1)
    ids, state = [], {}
    for g in groups:
        ids.append([len(state) + i for i in range(len(g["params"]))])
        for i, p in zip(ids[-1], g["params"]):
            state[i] = {"master": p.detach().float() + 1}
    opt = {"state": state, "param_groups": [{"params": i} for i in ids]}
    masters = _optimizer_masters(opt, model, run)
    assert len(masters) == sum(len(g["params"]) for g in groups)
    with pytest.raises(ExportError, match="optimizer groups do not match the model"):
        _optimizer_masters(dict(opt, param_groups=opt["param_groups"][:1]), model, run)
    state[ids[0][0]] = {"master": torch.zeros(3)}
    with pytest.raises(ExportError, match="master weight of .* has shape \\(3,\\)"):
        _optimizer_masters(opt, model, run)


def test_document_boundaries_train_in_the_packed_kernel(tmp_path, tiny_data, monkeypatch):
    """data.boundaries restarts positions at each document; transformers then masks attention
    across documents, which fastlm's attention serves with segment ids on the varlen kernels
    (no dense-mask fallback): the losses equal eager attention's."""
    from fastlm.integrations import _hf_attention

    segments, warned = [], set()
    real = _hf_attention.attention
    monkeypatch.setattr(_hf_attention, "_warned", warned)
    monkeypatch.setattr(_hf_attention, "attention", lambda *a, **k: (
        segments.append(k["segment_ids"]), real(*a, **k))[1])
    args = ("data.boundaries=true", "train.max_steps=4", "eval.every=0", "model.patch=false")
    fused = run(config(tmp_path / "f", tiny_data, *args))
    eager = run(config(tmp_path / "e", tiny_data, *args, "model.attn_implementation=eager"))
    assert not warned  # (batches without a document start inside a block pack nothing)
    assert any(s is not None and int(s.max()) > 0 for s in segments)
    for x, y in zip(losses(fused), losses(eager)):
        assert abs(x - y) <= 1e-5 * abs(y), (losses(fused), losses(eager))


@pytest.mark.parametrize("boundaries", [False, True], ids=["blocks", "documents"])
def test_compiled_training_runs_the_kernels_and_exports(tmp_path, tiny_data, monkeypatch,
                                                        boundaries):
    """train.compile: the model is compiled in place, so its checkpoint keys are its own (a
    torch.compile wrapper put them under "_orig_mod." and the export failed), and the blocks
    go in with an all-ones mask, so the traced forward's mask is plain causal and fastlm's
    attention kernel runs (without one it fell back to SDPA). With document boundaries the
    packed-sequence mask is read outside the graph and the kernel gets the documents (it fell
    back to SDPA). Compiled with aot_eager here (inductor's C++ builds would take minutes);
    the losses equal the eager run's."""
    from transformers import AutoModelForCausalLM

    from fastlm.integrations import _hf_attention

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real(self, **{"backend": "aot_eager", **kw}))
    warned, calls = set(), []
    monkeypatch.setattr(_hf_attention, "_warned", warned)
    attention = _hf_attention.attention
    monkeypatch.setattr(_hf_attention, "attention",
                        lambda *a, **k: calls.append(k) or attention(*a, **k))
    args = ("train.max_steps=3", "eval.every=3", "export=true",
            f"data.boundaries={str(boundaries).lower()}")
    compiled = run(config(tmp_path / "c", tiny_data, *args, "train.compile=true"))
    assert not warned and calls
    if boundaries:
        assert any(k["segment_ids"] is not None for k in calls)
    plain = run(config(tmp_path / "p", tiny_data, *args))
    for a, b in zip(losses(compiled), losses(plain)):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(compiled), losses(plain))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "run" / "hf")
    assert not any(k.startswith("_orig_mod") for k in hf.state_dict())


def test_compiled_run_validates_and_samples_off_the_graph(tmp_path, tiny_data, monkeypatch):
    """train.compile: validation and samples run the model uncompiled. Compiled, their no-grad
    forwards (and each decoding step's new shapes) were traced into more graphs, filling
    dynamo's recompile limit: a sample of 30 tokens hit it, and training after the first
    validation ran ~25% slower. Every graph is now traced with gradients on."""
    from torch._dynamo.backends.debugging import aot_eager

    traced_grad_modes = []

    def backend(gm, example_inputs, **kw):
        traced_grad_modes.append(torch.is_grad_enabled())
        return aot_eager(gm, example_inputs, **kw)

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real(self, **{**kw, "backend": backend}))
    state = run(config(tmp_path, tiny_data, "train.max_steps=2", "eval.every=1",
                       "sample.every=1", "sample.tokens=4", "sample.prompt=The",
                       "train.compile=true"))
    assert state.step == 2 and traced_grad_modes and all(traced_grad_modes), traced_grad_modes


def test_throughput_leaves_out_validation_samples_and_saves(tmp_path, tiny_data, monkeypatch):
    """tokens/s and MFU count training time: the window after a validation and a checkpoint
    took them in (tokens/s fell ~20x there in a real run). Here each of them takes 1000 s of a
    clock the trainer reads; the logged rate stays that of the steps alone."""
    import types

    from fastlm.train import trainer

    offset = [0.0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + offset[0]))
    for name in ("_evaluate", "_log_sample", "_save"):
        real = getattr(trainer, name)

        def slow(*a, _real=real, **k):
            offset[0] += 1000.0
            return _real(*a, **k)

        monkeypatch.setattr(trainer, name, slow)
    run(config(tmp_path, tiny_data, "train.max_steps=4", "eval.every=2", "log.every=2",
               "checkpoint.every=2", "sample.every=2", "sample.tokens=2", "train.micro_batch_size=2"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    assert offset[0] >= 4000.0 and set(rates) == {2, 4}
    # 2 steps of 2 x 32 tokens: 1000 s in the window would give under 0.13 tokens/s
    assert rates[4] > 2 * 2 * 32 / 100.0, rates


def test_activation_checkpointing_recomputes_blocks_with_the_same_losses(tmp_path, tiny_data,
                                                                        monkeypatch):
    """train.activation_checkpointing: each block runs twice per training micro-step (forward,
    then its recompute in the backward), the losses equal a run that keeps activations (fp32,
    fastlm's attention and patch on), and the exported config still generates with a cache."""
    import fastlm.train.trainer as trainer

    counts = {}
    build = trainer.build_model

    def counting_build(*a, **k):
        model = build(*a, **k)
        key = len(counts)
        counts[key] = 0
        # the block's first module: transformers checkpoints the block's forward, not its
        # __call__, so the block's own hooks run once; what runs inside it runs again
        first = model.transformer.h[0].ln_1
        first.register_forward_pre_hook(lambda *_: counts.__setitem__(key, counts[key] + 1))
        return model

    monkeypatch.setattr(trainer, "build_model", counting_build)
    args = ("train.max_steps=3", "eval.every=0", "eval.batches=1", "train.grad_accum=2",
            "export=true")
    ckpt = run(config(tmp_path / "c", tiny_data, *args, "train.activation_checkpointing=true"))
    plain = run(config(tmp_path / "p", tiny_data, *args))
    # plain: 3 steps x 2 micro-steps forwards + the final evaluation's forward(s)
    evals = counts[1] - 6
    assert evals >= 1 and counts[0] == 12 + evals, counts
    for a, b in zip(losses(ckpt), losses(plain)):
        assert abs(a - b) <= 1e-6 * abs(b), (losses(ckpt), losses(plain))
    saved = json.loads((tmp_path / "c" / "run" / "hf" / "config.json").read_text())
    assert saved.get("use_cache", True) is not False


# a DeepSpeed JSON written for the Hugging Face Trainer (its ZeRO-3 example's shape)
HF_STYLE_DS = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 500,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                                                 "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 2000, "wall_clock_breakdown": False,
}


def _ds_json(tmp_path, content, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


def test_hf_trainer_style_deepspeed_json_resolves_its_auto_values(tmp_path, tiny_data):
    """"auto" is filled from the run config the way the HF Trainer fills it: batch sizes and
    clipping derived, fp16/bf16 by train.precision, all-"auto" optimizer/scheduler sections
    dropped (fastlm builds both), ZeRO bucket sizes from the hidden size."""
    from fastlm.train.engine import deepspeed_config

    ds = _ds_json(tmp_path, HF_STYLE_DS)
    cfg = config(tmp_path, tiny_data, f"train.deepspeed={ds}", "train.micro_batch_size=4",
                 "train.grad_accum=2", "train.grad_clip=0.7")
    out = deepspeed_config(cfg, 4, 2, 8, hidden_size=64)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"], out["gradient_clipping"]) == (4, 2, 8, 0.7)
    assert not {"fp16", "bf16", "optimizer", "scheduler"} & set(out)
    zero = out["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert out["steps_per_print"] == 2000  # the user's own values pass through
    # fp16: enabled, the user's loss-scaling settings kept
    fp16 = deepspeed_config(_with_train(cfg, precision="fp16"), 4, 2, 8, hidden_size=64)
    assert fp16["fp16"] == dict(HF_STYLE_DS["fp16"], enabled=True)
    # no model to size the buckets from: DeepSpeed's defaults
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 4, 2, 8)["zero_optimization"]


def _with_train(cfg, **train):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.mark.parametrize("content, message", [
    (dict(HF_STYLE_DS, optimizer={"type": "AdamW", "params": {"lr": 3e-4}}),
     r"'optimizer' section with values; fastlm builds the optimizer itself from optim.name, "
     r"optim.lr"),
    (dict(HF_STYLE_DS, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}}),
     r"'scheduler' section .* optim.warmup_steps"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}},
     r"sets zero_optimization.sub_group_size to \"auto\", which fastlm does not derive"),
    ([1, 2], r"holds a JSON list, not an object of DeepSpeed keys"),
])
def test_deepspeed_json_that_fastlm_cannot_honour_names_the_key(tmp_path, tiny_data, content,
                                                                 message):
    from fastlm.train.engine import deepspeed_config

    cfg = config(tmp_path, tiny_data, f"train.deepspeed={_ds_json(tmp_path, content)}")
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(cfg, 8, 1, 8, hidden_size=64)


def test_training_with_an_hf_trainer_deepspeed_json(tmp_path, tiny_data):
    """The HF-style ZeRO-3 JSON runs as is and trains like train.zero_stage=3 without it."""
    args = ("train.max_steps=3", "eval.every=0", "train.micro_batch_size=4")
    ds = _ds_json(tmp_path, HF_STYLE_DS)
    theirs = run(config(tmp_path / "hf", tiny_data, *args, f"train.deepspeed={ds}"))
    ours = run(config(tmp_path / "own", tiny_data, *args, "train.zero_stage=3"))
    for a, b in zip(losses(theirs), losses(ours)):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(theirs), losses(ours))


def test_eval_command_reads_a_run_directory(tmp_path, tiny_data):
    """fastlm eval on a training run (its latest checkpoint and the tokenizer it saved), in
    windows of the blocks it trained on (32 here): the preset's table has 256 positions, and
    those past the blocks never learned (a Shakespeare model trained on 64 scored 3.07 in
    windows of 256, where its run said 1.79). The export notes the blocks; fine-tuning keeps
    the longer note, a model from elsewhere gets none."""
    from transformers import AutoModelForCausalLM

    from fastlm import cli
    from fastlm.train.generate import context_length

    run(config(tmp_path, tiny_data, "train.max_steps=2", "eval.every=0", "export=true"))
    out = tmp_path / "eval.json"
    for model, block in ((tmp_path / "run", []), (tmp_path / "run" / "hf", []),
                         (tmp_path / "run" / "hf", ["--block-size", "256"])):
        assert cli.main(["eval", str(model), str(tiny_data), "--max-tokens", "300",
                         "--json", str(out), *block]) == 0
        res = json.loads(out.read_text())
        assert res["tokens"] == 299 and math.isfinite(res["loss"])
        assert res["block_size"] == (256 if block else 32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert hf.config.fastlm_trained_context == 32
    assert context_length(hf) == 256 and context_length(hf, trained=True) == 32
    run(config(tmp_path / "ft", tiny_data, "train.max_steps=1", "eval.every=0", "export=true",
               f"model.pretrained={tmp_path / 'run' / 'hf'}", "data.block_size=48"))
    ft = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "run" / "hf")
    assert ft.config.fastlm_trained_context == 48
    hf.config.fastlm_trained_context = None  # as a directory trained elsewhere
    del hf.config.fastlm_trained_context
    hf.save_pretrained(tmp_path / "elsewhere")
    run(config(tmp_path / "ft2", tiny_data, "train.max_steps=1", "eval.every=0",
               "export=true", f"model.pretrained={tmp_path / 'elsewhere'}"))
    ft2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ft2" / "run" / "hf")
    assert getattr(ft2.config, "fastlm_trained_context", None) is None


@pytest.mark.parametrize("kind, dims", [
    ("gpt2", dict(n_embd=32, n_layer=1, n_head=2, n_positions=64)),
    ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                 word_embed_proj_dim=32, max_position_embeddings=64)),  # table of 64 + 2
    ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=64)),  # rotary: a warning
])
def test_blocks_longer_than_a_pretrained_models_positions(tmp_path, tiny_data, kind, dims,
                                                          caplog):
    """A learned position table shorter than data.block_size is a config error naming both
    (the first forward crashed with an IndexError); a rotary model trains past its context
    with a warning. 64 positions take blocks of 64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastlm.train.model import check_context

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=300, **dims))
    check_context(model, 64)
    if kind == "llama":
        import logging

        with caplog.at_level(logging.WARNING, logger="fastlm"):
            check_context(model, 65)
        assert "longer than the model's max_position_embeddings (64)" in caplog.text
        return
    with pytest.raises(ConfigError, match=r"data.block_size=65 is longer than model.pretrained's "
                                          r"learned position table \(.*: 64 positions\); use "
                                          r"data.block_size <= 64"):
        check_context(model, 65)
    if kind == "gpt2":  # and through the trainer, before anything is written
        model.save_pretrained(tmp_path / "g")
        with pytest.raises(ConfigError, match="learned position table"):
            run(config(tmp_path, tiny_data, f"model.pretrained={tmp_path / 'g'}",
                       "model.overrides={}", "data.block_size=65", "train.max_steps=1"))
        assert not (tmp_path / "run").exists()


def test_resume_in_another_zero_stage(tmp_path, tiny_data):
    """ZeRO-1 and ZeRO-2 checkpoints share one layout: a run resumes from one into the other
    with the uninterrupted run's losses. Stage 0 and ZeRO, and ZeRO-3 and stages 1-2, do not
    load into each other (DeepSpeed failed with an AssertionError, a TypeError or a missing
    file): refused, naming the setting and its value."""
    common = ("train.micro_batch_size=2", "eval.every=0", "optim.warmup_steps=0",
              "optim.decay_steps=6", "checkpoint.every=3", "checkpoint.keep_last=2")
    full = run(config(tmp_path / "full", tiny_data, *common, "train.zero_stage=1",
                      "train.max_steps=6"))
    run(config(tmp_path / "split", tiny_data, *common, "train.zero_stage=1", "train.max_steps=3"))
    rest = run(config(tmp_path / "split", tiny_data, *common, "train.zero_stage=2",
                      "train.max_steps=6"), resume="auto")
    assert losses(rest) == pytest.approx(losses(full)[3:], rel=1e-6)
    for stage in (0, 3):
        with pytest.raises(ConfigError, match=rf"saved with ZeRO stage 2, this run has {stage}; "
                                              rf"resume with --set train.zero_stage=2"):
            run(config(tmp_path / "split", tiny_data, *common, f"train.zero_stage={stage}",
                       "train.max_steps=9"), resume="auto")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_train_called_again_in_the_process_holds_nothing_of_the_last_run(tmp_path, tiny_data,
                                                                       monkeypatch, stage):
    """A notebook or a sweep calls train() again and again: no finished run's engine or model may
    stay reachable (under ZeRO-3 every run's model stayed, ~550 MB a run for a 33M model)."""
    import gc
    import weakref

    from fastlm.train import trainer as ftrainer

    runs = []
    real = ftrainer.initialize

    def remember(cfg, model, *a, **k):
        engine, optimizer, scheduler = real(cfg, model, *a, **k)
        runs.append((weakref.ref(engine), weakref.ref(model)))
        return engine, optimizer, scheduler

    def assert_all_freed(count):
        gc.collect()
        assert len(runs) == count
        alive = [(n, what) for n, refs in enumerate(runs)
                 for what, ref in zip(("engine", "model"), refs) if ref() is not None]
        assert not alive, alive

    monkeypatch.setattr(ftrainer, "initialize", remember)
    args = ["train.max_steps=2", "eval.every=2", f"train.zero_stage={stage}"]
    for i in range(2):
        run(config(tmp_path / str(i), tiny_data, *args, "train.precision=bf16"))
        assert_all_freed(i + 1)
    # a run that fails after its engine is built (resuming in another precision) frees it too
    with pytest.raises(ConfigError, match="was trained in bf16"):
        run(config(tmp_path / "0", tiny_data, *args, "train.precision=fp32"), resume="auto")
    assert_all_freed(3)


def test_wsd_run_extends_from_a_stable_phase_checkpoint(tmp_path, tiny_data):
    """Warmup-stable-decay's point: a checkpoint from the stable phase resumes into a longer
    run, whose cooldown moves to its new end; the steps in between stay at the peak lr."""
    args = ["train.micro_batch_size=2", "eval.every=0", "log.every=1", "optim.schedule=wsd",
            "optim.warmup_steps=1", "optim.decay_steps=2", "optim.min_lr=1e-4",
            "checkpoint.every=2", "checkpoint.keep_last=5"]
    run(config(tmp_path, tiny_data, *args, "train.max_steps=6"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    short = [r["lr"] for r in rows if "lr" in r]
    assert short[:4] == [1e-3] * 4 and short[-1] == pytest.approx(1e-4)  # cooled at step 6
    ckpts = tmp_path / "run" / "checkpoints"
    stable = sorted(d for d in ckpts.iterdir() if d.name.startswith("step"))[1]  # step 4
    state = run(config(tmp_path, tiny_data, *args, "train.max_steps=10"), resume=str(stable))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}  # the resumed run's steps last
    assert state.step == 10
    assert [lr[s] for s in (5, 6, 7, 8)] == [1e-3] * 4 and lr[10] == pytest.approx(1e-4)


def test_data_mix_trains_and_resumes_exactly(tmp_path, tiny_data):
    """data.mix: two prepared datasets (one tokenizer) in 3:1; the resumed curve is the
    uninterrupted one (every source continues where it stopped)."""
    from conftest import make_dataset

    other = make_dataset(tmp_path / "other", n_docs=25)
    args = ["train.micro_batch_size=2", "eval.every=2", "log.every=1",
            f"data.mix={{{tiny_data}: 3, {other}: 1}}"]
    whole = run(config(tmp_path / "a", tiny_data, *args, "train.max_steps=4"))
    run(config(tmp_path / "b", tiny_data, *args, "train.max_steps=2"))
    resumed = run(config(tmp_path / "b", tiny_data, *args, "train.max_steps=4"), resume="auto")
    assert losses(resumed)[-2:] == losses(whole)[-2:]
    # validation: each source's val split, the headline their mix-weighted mean
    rows = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
            .splitlines() if "val_loss" in x]
    assert len(rows) == 2
    for r in rows:
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/pydoc"]
                                              + 0.25 * r["val_loss/other"], rel=1e-12)
        assert r["val_loss/pydoc"] != r["val_loss/other"]
    with pytest.raises(ConfigError, match="data.mix: '.*missing' is not a prepared dataset"):
        run(config(tmp_path / "c", tiny_data, "train.max_steps=1",
                   f"data.mix={{{tiny_data}: 1, {tmp_path / 'missing'}: 1}}"))


def test_samples_along_the_run_leave_the_training_streams_alone(tmp_path, tiny_data, capsys):
    """sample.every: a sample every N steps (from the seed, on a forked RNG), so a run with
    them has the loss curve of one without, dropout on (sampling at temperature 0.8 draws
    from the RNG that dropout draws from)."""
    args = ["train.micro_batch_size=2", "train.max_steps=4", "eval.every=0", "log.every=1",
            "model.overrides={n_layer: 2, n_embd: 64, n_head: 2, resid_pdrop: 0.2, "
            "embd_pdrop: 0.2, attn_pdrop: 0.2}", "sample.tokens=6", "sample.prompt=The"]
    plain = run(config(tmp_path / "a", tiny_data, *args))
    capsys.readouterr()
    sampled = run(config(tmp_path / "b", tiny_data, *args, "sample.every=2"))
    out = capsys.readouterr().out
    assert losses(sampled) == losses(plain)
    assert out.count("--- sample ---") == 2 and "step 2: --- sample ---\nThe" in out
    rows = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text()
            .splitlines() if '"sample"' in x]
    assert [r["step"] for r in rows] == [2, 4] and all(r["sample"].startswith("The")
                                                     for r in rows)


def test_multiple_choice_accuracy_at_each_evaluation(tmp_path, tiny_data, capsys):
    """eval.choices: the records' accuracy by completion likelihood is logged with the
    validation loss, equal to what `fastlm eval --choices` computes on the exported model."""
    from fastlm.train.choices import accuracy, read_choices
    from fastlm.train.generate import load_tokenizer

    records = [{"ctx": f"Topic {i}: the", "endings": [" list", " class of objects", " of"],
                "label": i % 3} for i in range(7)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    run(config(tmp_path, tiny_data, "train.micro_batch_size=2", "train.max_steps=2",
               "eval.every=1", f"eval.choices={path}", "export=true"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines() if "choices_acc" in x]
    assert [r["step"] for r in rows] == [1, 2]
    assert "choices accuracy" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    res = accuracy(hf, load_tokenizer(tmp_path / "run" / "hf"), read_choices(path))
    assert (rows[-1]["choices_acc"], rows[-1]["choices_acc_norm"]) == (res.acc, res.acc_norm)
    with pytest.raises(ConfigError, match=r"eval.choices: .*nope.jsonl not found"):
        run(config(tmp_path / "x", tiny_data, f"eval.choices={tmp_path / 'nope.jsonl'}"))


def test_export_of_a_fine_tune_is_the_trained_model_not_its_base(tmp_path):
    """A pretrained directory holds its tokenizer beside its weights, as every HF model
    directory does. `fastlm prepare --tokenizer DIR` copied the whole directory as the data's
    tokenizer, the run copied it on, and the export copied its files over the model's: the
    exported "fine-tune" was the base model (weights and config). Now the tokenizer is saved
    alone, and an export never writes over the model's files (data prepared before the fix)."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fastlm.data import prepare
    from fastlm.data.tokenizer import byte_level
    from fastlm.train.export import export, load_model

    base = tmp_path / "base"
    conf = AutoConfig.for_model("gpt2", vocab_size=257, n_embd=32, n_layer=1, n_head=2,
                                n_positions=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(base)
    byte_level(base)
    (tmp_path / "text.txt").write_text("".join(f"line {i} of some text.\n\n" for i in range(300)))
    data = prepare([tmp_path / "text.txt"], tmp_path / "data", tokenizer=str(base),
                   dedup=False, progress=False, val_fraction=0.1)
    saved = sorted(p.name for p in (data / "tokenizer").iterdir())
    assert "model.safetensors" not in saved and "config.json" not in saved
    assert AutoTokenizer.from_pretrained(data / "tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(base).get_vocab()
    cfg = load_config(None, [f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                             f"model.pretrained={base}", "data.block_size=32",
                             "train.max_steps=3", "optim.lr=1e-2", "eval.every=0",
                             "log.progress=false", "log.tensorboard=false", "export=true"])
    run(cfg)
    trained, _, _ = load_model(tmp_path / "run")
    want = {k: v for k, v in trained.state_dict().items() if "attn.bias" not in k}

    def check(hf_dir):
        got = load_file(hf_dir / "model.safetensors")
        before = load_file(base / "model.safetensors")
        for name, value in got.items():
            if name in want:
                torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
        assert any(not torch.equal(got[k], before[k]) for k in got if k in before)

    check(tmp_path / "run" / "hf")
    # data prepared before the fix: the run's tokenizer directory holds the base's files
    for name in ("model.safetensors", "config.json"):
        shutil.copy(base / name, tmp_path / "run" / "tokenizer" / name)
    export(tmp_path / "run", tmp_path / "hf2")
    check(tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == \
        json.loads((tmp_path / "run" / "hf" / "config.json").read_text())


def test_a_run_given_in_epochs_takes_its_steps_from_the_data(tmp_path, tiny_data, capsys):
    from fastlm.data.loader import BlockLoader
    from fastlm.train.plan import plan, resolve_run_length

    cfg = config(tmp_path, tiny_data, "train.micro_batch_size=4", "train.epochs=0.01",
                 "eval.every=0", "optim.warmup_steps=40")
    blocks = BlockLoader(tiny_data, 32, 1).tokens_per_epoch // 32
    steps = math.ceil(0.01 * blocks / 4)
    # the plan counts them as the run will
    assert plan(resolve_run_length(cfg, 1), 1)["tokens_total"] == steps * 4 * 32
    state = run(cfg)
    assert state.step == steps
    out = capsys.readouterr().out
    assert f"train.epochs=0.01 -> train.max_steps={steps} ({blocks:,} blocks an epoch" in out
    assert f"{steps} steps read {steps * 4 / blocks:.3g} epochs" in out  # the header's
    # a config's warmup outlasting the steps the epochs came to is announced
    assert f"optim.warmup_steps=40 is not shorter than the run ({steps} steps)" in out
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert (saved["max_steps"], saved["epochs"]) == (steps, None)  # a resume counts steps
    with pytest.raises(ConfigError, match="train.epochs: .* is not prepared yet"):
        resolve_run_length(config(tmp_path, tmp_path / "none", "train.epochs=1"), 1)


class _FakeWandb(types.ModuleType):
    """wandb's calls the trainer makes, recorded (the offline library writes a binary log no
    public API reads back; test_metrics runs the real one). A module with a spec: libraries
    the trainer imports look for wandb with importlib."""

    def __init__(self):
        import importlib.machinery

        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.rows, self.finished = [], [], 0
        self.Html = lambda text: ("html", text)

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, values, step):
        self.rows.append((step, values))

    def finish(self):
        self.finished += 1


def test_wandb_logs_the_runs_metrics_config_and_samples_and_resumes_its_run(
        tmp_path, tiny_data, monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sets = ["train.micro_batch_size=4", "eval.every=2", "log.every=1", "log.wandb=true",
            "checkpoint.every=2", "sample.tokens=4", "log.wandb_project=proj"]
    run(config(tmp_path, tiny_data, "train.max_steps=2", *sets))
    (first,) = fake.inits
    assert first["project"] == "proj" and first["name"] == "run"
    assert first["id"] == (tmp_path / "run" / "wandb_id").read_text().strip()
    assert first["resume"] == "allow" and first["config"]["train"]["max_steps"] == 2
    logged = {}
    for step, values in fake.rows:
        logged.setdefault(step, {}).update(values)
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(logged[1])
    assert {"loss", "val_loss", "val_ppl"} <= set(logged[2])
    assert logged[2]["sample"][0] == "html" and logged[2]["sample"][1].startswith("<pre>")
    assert fake.finished == 1
    jsonl = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[2]["val_loss"] == next(r["val_loss"] for r in jsonl if "val_loss" in r)
    # a resume continues the same W&B run
    run(config(tmp_path, tiny_data, "train.max_steps=3", *sets), resume="auto")
    assert fake.inits[1]["id"] == first["id"] and max(s for s, _ in fake.rows) == 3


def test_wandb_without_the_library_is_a_config_error_before_anything_is_written(
        tmp_path, tiny_data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"log.wandb is on but wandb is not installed: pip "
                                          r"install wandb .*or set log.wandb=false"):
        run(config(tmp_path, tiny_data, "log.wandb=true", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()
