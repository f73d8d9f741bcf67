"""fastlm eval on preference pairs: every held-out pair once, each answer's log-probability as
the model computes it for that pair alone, and DPO's implicit reward against a reference."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastlm.cli import main
from fastlm.data.loader import Batch
from fastlm.data.pairs import PairLoader


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    from fastlm.data import prepare

    root = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"Q{i}?" * (1 + i % 3), "chosen": "yes" * (1 + i % 2), "rejected": "no!"}
            for i in range(11)]  # 11 pairs: batches of 4 leave a partial one
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare([root / "prefs.jsonl"], root / "data", tokenizer="byte", preference=True,
                   dedup=False, progress=False, val_fraction=0.0)


def _model_dir(path, prefs, seed):
    conf = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(conf).save_pretrained(path)
    for f in (prefs / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    return path


def _alone(model, loader):
    """(summed log-prob, answer tokens) of every answer, each pair in a batch of its own."""
    from fastlm.train.dpo import sequence_logps

    out = []
    with torch.no_grad():
        for p in range(loader.pairs):
            batch = loader.batch_of([p])
            logps = sequence_logps(model, Batch(batch.input_ids, batch.targets))
            out.append((logps.tolist(), (batch.targets != -100).sum(-1).tolist()))
    return out


def test_every_pair_once_as_alone(tmp_path, prefs):
    from fastlm.train.pair_eval import evaluate_pairs

    model = AutoModelForCausalLM.from_pretrained(_model_dir(tmp_path / "m", prefs, 0)).eval()
    loader = PairLoader(prefs, 256, 1, split_name="train")
    assert loader.pairs == 11
    got = evaluate_pairs(model, loader, batch_size=4, progress=False)
    alone = _alone(model, loader)
    chosen = [lp[0] for lp, _ in alone]
    rejected = [lp[1] for lp, _ in alone]
    assert got.pairs == 11
    assert got.pref_acc == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 11)
    assert got.pref_acc_norm == pytest.approx(
        sum(lp[0] / n[0] > lp[1] / n[1] for lp, n in alone) / 11)
    assert got.logp_chosen == pytest.approx(sum(chosen) / 11, rel=1e-5)
    assert got.logp_rejected == pytest.approx(sum(rejected) / 11, rel=1e-5)
    assert got.reward_acc is None


def test_the_reference_gives_dpo_s_reward(tmp_path, prefs):
    from fastlm.train.pair_eval import evaluate_pairs

    model = AutoModelForCausalLM.from_pretrained(_model_dir(tmp_path / "m", prefs, 0)).eval()
    other = AutoModelForCausalLM.from_pretrained(_model_dir(tmp_path / "r", prefs, 1)).eval()
    loader = PairLoader(prefs, 256, 1, split_name="train")
    itself = evaluate_pairs(model, loader, reference=model, beta=0.5, progress=False)
    # policy = reference: every reward is 0, no pair ranked, the loss log 2
    assert (itself.reward_acc, itself.reward_margin) == (0.0, 0.0)
    assert itself.dpo_loss == pytest.approx(math.log(2))
    got = evaluate_pairs(model, loader, reference=other, beta=0.5, batch_size=3, progress=False)
    h = [(a[0] - b[0]) - (a[1] - b[1])
         for (a, _), (b, _) in zip(_alone(model, loader), _alone(other, loader))]
    assert got.reward_acc == pytest.approx(sum(x > 0 for x in h) / 11)
    assert got.reward_margin == pytest.approx(0.5 * sum(h) / 11, rel=1e-4)
    assert got.dpo_loss == pytest.approx(
        sum(math.log1p(math.exp(-0.5 * x)) for x in h) / 11, rel=1e-4)


def test_eval_command_on_pairs(tmp_path, prefs, capsys):
    model = _model_dir(tmp_path / "m", prefs, 0)
    ref = _model_dir(tmp_path / "r", prefs, 1)
    out = tmp_path / "pairs.json"
    assert main(["eval", str(model), str(prefs), "--split", "train", "--reference", str(ref),
                 "--beta", "0.2", "--json", str(out)]) == 0
    said = capsys.readouterr().out
    assert "11 pairs: the chosen answer likelier in" in said and "reward accuracy" in said
    record = json.loads(out.read_text())
    assert record["pairs"] == 11 and record["beta"] == 0.2 and record["reference"] == str(ref)
    # the kernels and transformers' own code agree
    assert main(["eval", str(model), str(prefs), "--split", "train", "--reference", str(ref),
                 "--beta", "0.2", "--no-kernels", "--json", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    for key in ("pref_acc", "reward_acc"):
        assert plain[key] == record[key]
    for key in ("logp_chosen", "reward_margin", "dpo_loss"):
        assert plain[key] == pytest.approx(record[key], rel=1e-4)


def test_eval_pair_errors_are_named(tmp_path, prefs, tiny_data, capsys):
    model = _model_dir(tmp_path / "m", prefs, 0)
    assert main(["eval", str(model), str(tiny_data), "--reference", str(model)]) == 2
    assert "--reference compares answers of preference pairs" in capsys.readouterr().err
    assert main(["eval", str(model), str(prefs), "--reference", str(tmp_path / "nope")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["eval", str(model), str(prefs), "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err
