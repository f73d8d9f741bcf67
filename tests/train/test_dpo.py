"""DPO (train.objective=dpo): preference pairs prepared and read a pair at a time, the loss
against float64, the LoRA reference = the model with its adapters off, and a run that learns
to prefer the chosen answers."""

import json
import math
import re

import numpy as np
import pytest
import torch

from fastlm.data.errors import DataError
from fastlm.data.loader import IGNORE_INDEX, Batch
from fastlm.train.config import ConfigError, load_config


@pytest.fixture(scope="module", autouse=True)
def _env(launcher_env):
    yield


def _pairs(root, rows, **kw):
    from fastlm.data import prepare

    root.mkdir(parents=True, exist_ok=True)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare([root / "prefs.jsonl"], root / "data", tokenizer="byte", preference=True,
                   dedup=False, progress=False, **kw)


ROWS = [{"prompt": f"Say yes {i}?", "chosen": "Yes.", "rejected": "No!"} for i in range(24)]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    hh = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
          "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}]}
    return _pairs(tmp_path_factory.mktemp("prefs"), [*ROWS, hh], val_fraction=0.15, seed=1)


def _decode(root, ids):
    from fastlm.train.generate import load_tokenizer

    return load_tokenizer(root / "tokenizer").decode([int(i) for i in ids])


def test_pairs_are_consecutive_documents_with_the_last_answer_trained(prefs):
    from fastlm.data.format import open_split, read_meta

    meta = read_meta(prefs)
    assert meta["preference"] and meta["sft"]
    shard = open_split(prefs, "train").shards[0]
    starts = shard.doc_starts
    assert (len(starts) - 1) % 2 == 0
    seen = set()
    for k in range(0, len(starts) - 1, 2):
        docs = []
        for d in (k, k + 1):
            toks = np.asarray(shard.tokens[starts[d]:starts[d + 1]])
            keep = np.asarray(shard.mask[starts[d]:starts[d + 1]]).astype(bool)
            docs.append((_decode(prefs, toks), _decode(prefs, toks[keep])))
        (chosen, c_ans), (rejected, r_ans) = docs
        # one prompt, two answers: the text before each answer is the same
        assert chosen[:-len(c_ans)] == rejected[:-len(r_ans)]
        seen.add((c_ans, r_ans))
    assert seen <= {("Yes.<|endoftext|>", "No!<|endoftext|>"),
                    ("Hey<|endoftext|>", "Go<|endoftext|>")}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "chosen and rejected answers are the same"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "the chosen conversation must end in an assistant's answer"),
])
def test_bad_pairs_name_the_record(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        _pairs(tmp_path, [row, *ROWS])


def test_pair_loader_rows_and_stream(prefs):
    from fastlm.data.pairs import PairLoader

    ld = PairLoader(prefs, 64, 3, seed=0)
    batch = ld.batch_at(0)
    assert batch.input_ids.shape[0] == 6
    for i in range(3):  # row i and row 3 + i: one prompt, chosen then rejected
        c, r = batch.input_ids[i], batch.input_ids[3 + i]
        answer = [t for t in batch.targets[i].tolist() if t != IGNORE_INDEX]
        assert _decode(prefs, answer) in ("Yes.<|endoftext|>", "Hey<|endoftext|>")
        n = int((batch.targets[i] != IGNORE_INDEX).nonzero()[0])  # where the answer starts
        assert torch.equal(c[:n + 1], r[:n + 1])
    # an epoch reads every pair once; any ranks x micro-batch read the same pairs in a step
    one = [ld._pair(c) for c in range(ld.pairs)]
    assert sorted(one) == list(range(ld.pairs))
    two = torch.cat([PairLoader(prefs, 64, 3, seed=0, rank=r, world_size=2).batch_at(1)
                     .input_ids for r in (0, 1)])
    whole = PairLoader(prefs, 64, 6, seed=0).batch_at(1).input_ids
    width = min(two.shape[1], whole.shape[1])
    ordered = torch.cat([two[:3], two[6:9], two[3:6], two[9:]])  # chosen, then rejected
    assert torch.equal(ordered[:, :width], whole[:, :width])


def test_pair_loader_refuses_plain_data(tiny_data):
    from fastlm.data.format import FormatError
    from fastlm.data.pairs import PairLoader

    with pytest.raises(FormatError, match="no preference pairs.*--preference"):
        PairLoader(tiny_data, 32, 2)


def test_pair_loader_names_ids_outside_the_vocabulary(prefs, tmp_path):
    import shutil

    from fastlm.data.format import FormatError
    from fastlm.data.pairs import PairLoader

    bad = tmp_path / "bad"
    shutil.copytree(prefs, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["vocab_size"] = 100  # byte ids reach 255 and EOS past it
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="holds token id .*outside the vocabulary of 100"):
        PairLoader(bad, 64, 2).batch_at(0)


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_against_float64(kind, smoothing):
    from fastlm.train.dpo import dpo_loss

    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(10, generator=g) * 5, torch.randn(10, generator=g) * 5
    loss, acc, margin = dpo_loss(policy, ref, 0.3, kind, smoothing)
    p, r = policy.double(), ref.double()
    h = (p[:5] - r[:5]) - (p[5:] - r[5:])
    if kind == "ipo":
        want = ((h - 1 / 0.6) ** 2).mean()
    else:  # -log sigmoid(x) = log(1 + exp(-x)); a smoothed share e of labels flipped
        want = ((1 - smoothing) * torch.log1p(torch.exp(-0.3 * h))
                + smoothing * torch.log1p(torch.exp(0.3 * h))).mean()
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    assert acc.item() == pytest.approx((h > 0).double().mean().item())
    assert margin.item() == pytest.approx(0.3 * h.mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind, smoothing", [("simpo", 0.0), ("simpo", 0.1), ("orpo", 0.0)])
def test_reference_free_losses_against_float64(kind, smoothing):
    from fastlm.train.dpo import dpo_loss

    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 9, (8,), generator=g)
    policy = -torch.rand(8, generator=g) * 3 * counts  # summed log-probs: below 0
    loss, acc, margin = dpo_loss(policy, None, 2.0, kind, smoothing, counts=counts, gamma=0.7)
    mean = policy.double() / counts.double()
    if kind == "simpo":
        h = mean[:4] - mean[4:]
        z = 2.0 * h - 0.7
        want = ((1 - smoothing) * torch.log1p(torch.exp(-z)) + smoothing * torch.log1p(torch.exp(z)))
    else:  # the odds p / (1 - p) of the mean token probability p
        p = torch.exp(mean)
        odds = torch.log(p / (1 - p))
        h = odds[:4] - odds[4:]
        want = -mean[:4] + 2.0 * torch.log1p(torch.exp(-h))
    assert abs(loss.item() - want.mean().item()) <= 1e-6 * abs(want.mean().item())
    assert acc.item() == pytest.approx((h > 0).double().mean().item())
    assert margin.item() == pytest.approx(2.0 * h.mean().item(), rel=1e-5)


def _tiny(lora=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


def test_sequence_logps_of_padded_rows_are_each_rows_alone():
    from fastlm.train.dpo import sequence_logps

    model = _tiny().eval()
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    lengths = [9, 5, 7]
    for i, n in enumerate(lengths):
        targets[i, n:] = IGNORE_INDEX
        targets[i, :2] = IGNORE_INDEX  # the prompt
    got = sequence_logps(model, Batch(ids, targets))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[i:i + 1, :n]).logits[0].double(), -1)
        want = logp[torch.arange(2, n), targets[i, 2:n]].sum()
        assert abs(got[i].item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
def test_fused_sequence_logps_equal_the_full_logits_ones(patched):
    """fused=True (the head in chunks, per-token losses, no full logits): the same log-probs
    and parameter gradients as from the full logits, directly or through fastlm.patch's head
    module (the path ZeRO-3 takes)."""
    import fastlm
    from fastlm.train.dpo import sequence_logps

    model = _tiny()
    if patched:
        fastlm.patch(model, attention=False)
    ids = torch.randint(0, 300, (4, 11), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 300, (4, 11), generator=torch.Generator().manual_seed(4))
    targets[:, :3] = IGNORE_INDEX
    targets[1, 6:] = IGNORE_INDEX
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # DPO's gradient differs per row

    def run(fused):
        model.zero_grad()
        logps = sequence_logps(model, Batch(ids, targets), fused)
        (logps * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run(False)
    fused, fused_grads = run(True)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    for name, g in full_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_dpo_runs_the_head_in_chunks_and_follows_the_full_logits(tmp_path, prefs,
                                                                        monkeypatch):
    from fastlm.integrations import _patch_loss

    calls = []
    real = _patch_loss.head_loss
    monkeypatch.setattr(_patch_loss, "head_loss",
                        lambda *a, **k: calls.append(k["reduction"]) or real(*a, **k))
    args = ["model.lora.r=4", "train.max_steps=3", "eval.every=3"]
    fused = _dpo_run(tmp_path / "a", prefs, *args)
    # 3 steps and 2 val batches, each a reference and a policy forward
    assert calls == ["none"] * 10
    full = _dpo_run(tmp_path / "b", prefs, *args, "train.fused_loss=false")
    assert len(calls) == 10
    assert [x for _, x in fused.history] == pytest.approx([x for _, x in full.history],
                                                           rel=1e-5)


def test_pairs_count_their_real_tokens_and_flops():
    """tokens/s and MFU of a DPO run: each row at its own length (it ends with its answer,
    padding after it is not counted), the policy's training FLOPs and, with a reference, its
    forward's (a third of a fully trained step's)."""
    from fastlm.train.dpo import PairFlops, row_lengths
    from fastlm.train.model import flops_per_token

    targets = torch.full((3, 8), IGNORE_INDEX)
    targets[0, 2:5] = 1
    targets[1, 3:8] = 1
    assert row_lengths(Batch(torch.zeros_like(targets), targets)).tolist() == [5, 8, 0]
    model = _tiny()
    with_ref, alone = PairFlops(model, True), PairFlops(model, False)
    assert with_ref.of([5, 8, 5]) == pytest.approx(sum(
        (flops_per_token(model, n) + flops_per_token(model, n, forward_only=True)) * n
        for n in (5, 8, 5)))
    assert alone.of([5]) == flops_per_token(model, 5) * 5
    assert flops_per_token(model, 64, forward_only=True) == pytest.approx(
        flops_per_token(model, 64) / 3)


def test_nll_weight_adds_the_chosen_answers_token_loss(prefs):
    """RPO (train.dpo_nll_weight): the loss grows by the weight times the chosen answers' mean
    token loss, and nothing else moves."""
    from fastlm.data.pairs import PairLoader
    from fastlm.train.dpo import DpoObjective, sequence_logps

    model = _tiny()
    batch = PairLoader(prefs, 64, 3).batch_at(0)
    plain, _ = DpoObjective(0.5, None, "simpo").loss(model, batch)
    rpo, _ = DpoObjective(0.5, None, "simpo", nll_weight=0.3).loss(model, batch)
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    counts = (batch.targets != IGNORE_INDEX).sum(-1)
    nll = -(logps[:3] / counts[:3]).mean()
    assert (rpo - plain).item() == pytest.approx(0.3 * nll.item(), rel=1e-4)


def test_reference_under_lora_is_the_model_before_its_adapters():
    from fastlm.train.config import LoraSettings
    from fastlm.train.dpo import adapters_off
    from fastlm.train.lora import apply_lora

    base = _tiny().eval()
    model = _tiny().eval()
    apply_lora(model, LoraSettings(r=2))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3
        with adapters_off(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits)
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3  # back on
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def _dpo_run(tmp_path, data, *extra, resume=None):
    from fastlm.train.trainer import train

    return train(load_config(None, [
        f"data.path={data}", f"out_dir={tmp_path / 'run'}", "model.preset=tiny-llama",
        "train.objective=dpo", "data.block_size=64", "train.micro_batch_size=4",
        "optim.lr=5e-3", "optim.warmup_steps=2", "eval.every=0", "eval.batches=2",
        "log.every=1", "log.progress=false", "log.tensorboard=false", *extra]), resume=resume)


def test_lora_dpo_run_learns_to_prefer_the_chosen_answers(tmp_path, prefs, capsys):
    state = _dpo_run(tmp_path, prefs, "model.lora.r=8", "train.max_steps=25")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = [r["reward_acc"] for r in rows if "reward_acc" in r]
    val = [r for r in rows if "val_reward_acc" in r][-1]
    # every pair ranked right, the losses under log 2 (where policy = reference), training's
    # well under
    assert acc[-1] == 1.0 and val["val_reward_acc"] == 1.0
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in rows if "reward_acc" in r)
    # the margin grows from 0 (policy = reference at the start); the chosen answers' log-probs
    # above the rejected ones' by the end
    steps = [r for r in rows if "reward_margin" in r]
    assert abs(steps[0]["reward_margin"]) < 1e-6 and steps[-1]["reward_margin"] > 0.5
    assert val["val_reward_margin"] > 0.05  # (the val loss under log 2)
    assert steps[-1]["logp_chosen"] > steps[-1]["logp_rejected"]
    assert state.history[-1][1] < 0.5 * math.log(2) and val["val_loss"] < math.log(2)
    out = capsys.readouterr().out
    assert "reward accuracy 1.000 (DPO loss)" in out
    # the run's header: the pairs of the split and the epochs 25 steps read of them
    from fastlm.data.pairs import PairLoader

    pairs = PairLoader(prefs, 64, 4).pairs
    glob = int(re.search(r"= (\d+) pairs a step \(a chosen and a rejected answer each, "
                         r"up to 64 tokens\); 25 steps", out).group(1))
    assert f"{pairs:,} training pairs; 25 steps read {25 * glob / pairs:.3g} epochs" in out


def test_full_weight_dpo_keeps_a_frozen_reference_and_zero3_needs_lora(tmp_path, prefs,
                                                                       monkeypatch):
    from fastlm.train import dpo as fdpo

    made = []
    real = fdpo.objective

    def keep(cfg, model, dev):
        made.append((real(cfg, model, dev), {n: p.detach().clone()
                                             for n, p in model.named_parameters()}))
        return made[-1][0]

    monkeypatch.setattr(fdpo, "objective", keep)
    state = _dpo_run(tmp_path / "a", prefs, "train.max_steps=3", "train.precision=bf16")
    objective, start = made[-1]
    ref = objective.reference
    assert ref is not None and next(ref.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in ref.parameters())
    # the reference stays the starting weights (in the run's dtype) while the model trains
    for name, p in ref.named_parameters():
        assert torch.equal(p, start[name].to(torch.bfloat16)), name
    assert len(state.history) == 3 and all(math.isfinite(x) for _, x in state.history)
    with pytest.raises(ConfigError, match="without model.lora.*ZeRO-3.*use model.lora"):
        _dpo_run(tmp_path / "b", prefs, "train.max_steps=1", "train.zero_stage=3")


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_runs_keep_no_reference_and_learn(tmp_path, prefs, monkeypatch, kind):
    """SimPO and ORPO: no reference copy and no reference forward (one pass of the model a
    micro-batch), full weights under ZeRO-3 accepted, and every pair ranked right."""
    from fastlm.train import dpo as fdpo

    made, forwards = [], []
    real, real_logps = fdpo.objective, fdpo.sequence_logps
    monkeypatch.setattr(fdpo, "objective", lambda *a: made.append(real(*a)) or made[-1])
    monkeypatch.setattr(fdpo, "sequence_logps",
                        lambda m, *a: forwards.append(m) or real_logps(m, *a))
    beta = "2.0" if kind == "simpo" else "0.5"
    state = _dpo_run(tmp_path, prefs, f"train.dpo_loss={kind}", f"train.dpo_beta={beta}",
                     "train.zero_stage=3", "train.max_steps=20", "eval.every=20")
    assert made[0].reference is None and made[0].kind == kind
    assert len(forwards) == 20 + 2  # the steps and the 2 validation batches
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "val_reward_acc" in r][-1]["val_reward_acc"] == 1.0
    assert state.history[-1][1] < state.history[0][1]


def test_precomputed_reference_follows_the_live_one(tmp_path, prefs, monkeypatch):
    """train.dpo_precompute_reference: the reference's log-probabilities of every pair once at
    the start, then no reference forward a step; the curve is the live reference's (LoRA's
    adapters off), and validation uses the val pairs' own table."""
    from fastlm.train import dpo as fdpo

    args = ["model.lora.r=4", "train.max_steps=4", "eval.every=2"]
    live = _dpo_run(tmp_path / "live", prefs, *args)
    forwards = []
    real = fdpo.sequence_logps
    monkeypatch.setattr(fdpo, "sequence_logps", lambda m, *a: forwards.append(1) or real(m, *a))
    pre = _dpo_run(tmp_path / "pre", prefs, *args, "train.dpo_precompute_reference=true")
    assert [x for _, x in pre.history] == pytest.approx([x for _, x in live.history], rel=1e-5)
    tables = torch.load(tmp_path / "pre" / "run" / "reference_logps.pt")
    pairs = tables["train"].shape[0] + tables["val"].shape[0]
    # the tables (ceil(pairs / 4) batches each), then one policy forward a step and val batch
    assert len(forwards) == -(-tables["train"].shape[0] // 4) + -(-tables["val"].shape[0] // 4) \
        + 4 + 2 * 2
    assert pairs == len(ROWS) + 1 and (tables["train"] < 0).all()
    rows = [json.loads(x) for x in (tmp_path / "pre" / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    want = [json.loads(x) for x in (tmp_path / "live" / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in want if "val_loss" in r], rel=1e-5)


def test_precomputed_reference_runs_full_weights_under_zero3_and_resumes(tmp_path, prefs):
    """No frozen copy: full-weight DPO under ZeRO-3; a resumed run reads the table saved at
    the start (its model is no longer the reference) and repeats the uninterrupted losses; a
    run resumed without the table is refused with the fix."""
    from fastlm.train.dpo import objective

    args = ["train.zero_stage=3", "train.dpo_precompute_reference=true", "checkpoint.every=2"]
    cfg = load_config(None, ["train.objective=dpo", *args])
    assert objective(cfg, _tiny(), torch.device("cpu")).reference is None
    whole = _dpo_run(tmp_path / "a", prefs, *args, "train.max_steps=4")
    _dpo_run(tmp_path / "b", prefs, *args, "train.max_steps=2")
    before = (tmp_path / "b" / "run" / "reference_logps.pt").read_bytes()
    resumed = _dpo_run(tmp_path / "b", prefs, *args, "train.max_steps=4", resume="auto")
    assert [x for _, x in resumed.history[-2:]] == [x for _, x in whole.history[-2:]]
    assert (tmp_path / "b" / "run" / "reference_logps.pt").read_bytes() == before
    (tmp_path / "b" / "run" / "reference_logps.pt").unlink()
    with pytest.raises(ConfigError, match="reference_logps.pt is missing"):
        _dpo_run(tmp_path / "b", prefs, *args, "train.max_steps=6", resume="auto")
    with pytest.raises(ConfigError, match="simpo has no reference"):
        load_config(None, ["train.objective=dpo", "train.dpo_loss=simpo",
                           "train.dpo_precompute_reference=true"])


def test_dpo_on_plain_data_names_the_fix(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="dpo: .*no preference pairs.*--preference"):
        _dpo_run(tmp_path, tiny_data, "train.max_steps=1")


def test_dpo_resumes_exactly(tmp_path, prefs):
    args = ["model.lora.r=4", "checkpoint.every=2"]
    whole = _dpo_run(tmp_path / "a", prefs, *args, "train.max_steps=4")
    _dpo_run(tmp_path / "b", prefs, *args, "train.max_steps=2")
    resumed = _dpo_run(tmp_path / "b", prefs, *args, "train.max_steps=4", resume="auto")
    assert [x for _, x in resumed.history[-2:]] == [x for _, x in whole.history[-2:]]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_follow_one_and_sample_under_zero3(tmp_path, prefs, child_env):
    """2 ranks x 2 pairs = 1 rank x 4 pairs a step (the same pairs, the same curve), LoRA under
    ZeRO-3; the samples along the run and at its end, where rank 0 generates alone (it crashed
    in ZeRO-3's start-of-forward hook after DPO's reference forwards), and the export."""
    import subprocess

    from test_distributed import LAUNCHER

    args = ["model.lora.r=4", "train.zero_stage=3", "train.max_steps=4", "eval.every=2"]
    one = _dpo_run(tmp_path / "one", prefs, *args)
    out = tmp_path / "two"
    sets = [f"data.path={prefs}", f"out_dir={out}", "model.preset=tiny-llama",
            "train.objective=dpo", "data.block_size=64", "train.micro_batch_size=2",
            "optim.lr=5e-3", "optim.warmup_steps=2", "eval.batches=2", "log.every=1",
            "log.progress=false", "log.tensorboard=false", *args, "sample.tokens=4",
            "sample.every=2", "export=true"]
    proc = subprocess.run([LAUNCHER, "--num_gpus", "2", "--module", "fastlm.train",
                           *sum((["--set", s] for s in sets), [])], env=child_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in rows if "loss" in r]
    assert two == pytest.approx([x for _, x in one.history], rel=2e-5)
    assert (out / "hf" / "model.safetensors").is_file()


def test_loss_settings_reach_the_objective_and_bad_ones_are_named():
    from fastlm.train.dpo import objective

    cfg = load_config(None, ["train.objective=dpo", "train.dpo_loss=ipo", "train.dpo_beta=0.5",
                             "model.lora.r=2"])
    got = objective(cfg, _tiny(), torch.device("cpu"))
    assert (got.kind, got.beta, got.reference) == ("ipo", 0.5, None)
    cfg = load_config(None, ["train.objective=dpo", "train.dpo_label_smoothing=0.1"])
    got = objective(cfg, _tiny(), torch.device("cpu"))
    assert got.label_smoothing == 0.1 and got.reference is not None
    with pytest.raises(ConfigError, match="'train.dpo_loss' must be one of"):
        load_config(None, ["train.objective=dpo", "train.dpo_loss=kto"])
    with pytest.raises(ConfigError, match=r"dpo_label_smoothing in \[0, 0.5\)"):
        load_config(None, ["train.objective=dpo", "train.dpo_label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="simpo_gamma >= 0"):
        load_config(None, ["train.objective=dpo", "train.dpo_loss=simpo", "train.simpo_gamma=-1"])
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid and simpo"):
        load_config(None, ["train.objective=dpo", "train.dpo_loss=ipo",
                           "train.dpo_label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="dpo_nll_weight >= 0"):
        load_config(None, ["train.objective=dpo", "train.dpo_nll_weight=-1"])
    with pytest.raises(ConfigError, match="orpo has already"):
        load_config(None, ["train.objective=dpo", "train.dpo_loss=orpo",
                           "train.dpo_nll_weight=0.5"])
    cfg = load_config(None, ["train.objective=dpo", "train.dpo_nll_weight=0.2", "model.lora.r=2"])
    assert objective(cfg, _tiny(), torch.device("cpu")).nll_weight == 0.2
    cfg = load_config(None, ["train.objective=dpo", "train.dpo_loss=simpo", "train.simpo_gamma=1",
                             "train.zero_stage=3"])
    got = objective(cfg, _tiny(), torch.device("cpu"))
    assert (got.kind, got.gamma, got.reference) == ("simpo", 1.0, None)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_share_the_precomputed_reference(tmp_path, prefs, child_env):
    """Full-weight DPO under ZeRO-3 with the reference precomputed: the 2 ranks split the
    pairs (as many forwards each: ZeRO-3 gathers with both), sum their tables and follow the
    one-rank curve; the table is the one-rank run's."""
    import subprocess

    from test_distributed import LAUNCHER

    args = ["train.zero_stage=3", "train.dpo_precompute_reference=true", "train.max_steps=3",
            "eval.every=3"]
    one = _dpo_run(tmp_path / "one", prefs, *args)
    out = tmp_path / "two"
    sets = [f"data.path={prefs}", f"out_dir={out}", "model.preset=tiny-llama",
            "train.objective=dpo", "data.block_size=64", "train.micro_batch_size=2",
            "optim.lr=5e-3", "optim.warmup_steps=2", "eval.batches=2", "log.every=1",
            "log.progress=false", "log.tensorboard=false", *args]
    proc = subprocess.run([LAUNCHER, "--num_gpus", "2", "--module", "fastlm.train",
                           *sum((["--set", s] for s in sets), [])], env=child_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(
        [x for _, x in one.history], rel=2e-5)
    mine = torch.load(out / "reference_logps.pt")
    theirs = torch.load(tmp_path / "one" / "run" / "reference_logps.pt")
    for split in ("train", "val"):
        torch.testing.assert_close(mine[split], theirs[split], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sets, name", [([], "DPO"), (["train.dpo_loss=ipo"], "IPO"),
                                        (["train.dpo_loss=simpo"], "SimPO"),
                                        (["train.dpo_loss=orpo"], "ORPO"),
                                        (["train.dpo_nll_weight=1"], "DPO + NLL")])
def test_validation_names_the_preference_loss_it_reports(sets, name):
    from fastlm.train.trainer import _pair_loss_name

    assert _pair_loss_name(load_config(None, ["train.objective=dpo", *sets])) == name


def test_epochs_of_preference_pairs(prefs):
    from fastlm.data.pairs import PairLoader
    from fastlm.train.plan import resolve_run_length

    cfg = load_config(None, [f"data.path={prefs}", "train.objective=dpo", "train.epochs=2",
                             "train.micro_batch_size=4", "data.block_size=64"])
    pairs = PairLoader(prefs, 64, 1).pairs
    assert resolve_run_length(cfg, 2).train.max_steps == math.ceil(2 * pairs / 8)
