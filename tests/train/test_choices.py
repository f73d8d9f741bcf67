"""Multiple-choice accuracy by completion likelihood: each ending's loss as the model alone
computes it (one sequence at a time, no padding), the likeliest ending picked."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_eval import _hf_dir
from transformers import AutoModelForCausalLM

from fastlm import cli
from fastlm.integrations._patch_loss import head_loss
from fastlm.train.choices import Choice, ChoicesError, accuracy, ending_losses, read_choices
from fastlm.train.generate import load_tokenizer

RECORDS = [Choice("The cat sat on the", [" mat.", " moon tonight, quietly", " a"], 0),
           Choice("Water boils at", [" 100 degrees", " noon"], 1),
           Choice("x", ["yz", " and a much longer ending than the others", "!"], 2)]


def _alone(model, tok, context, ending):
    """Summed loss of the ending's tokens: context + ending through the model unpadded."""
    ctx = tok(context, add_special_tokens=False).input_ids
    full = tok(context + ending, add_special_tokens=False).input_ids
    n = next((i for i, (a, b) in enumerate(zip(ctx, full)) if a != b), len(ctx))
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    return F.cross_entropy(logits[n - 1:-1], torch.tensor(full[n:]), reduction="sum").item(), \
        len(full) - n


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_batch_scores_each_ending_as_alone(tmp_path, kind, fused, monkeypatch):
    """Through the fused head (per-token losses in chunks) or the full logits alike."""
    from fastlm.train import choices

    path = _hf_dir(tmp_path, kind)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    calls = []
    monkeypatch.setattr(choices, "head_loss",
                        lambda *a, **k: calls.append(1) or head_loss(*a, **k))
    for c in RECORDS:
        total, count = ending_losses(model, tok, c, fused=fused)
        want = [_alone(model, tok, c.context, e) for e in c.endings]
        assert count.tolist() == [n for _, n in want]
        torch.testing.assert_close(total, torch.tensor([w for w, _ in want]), rtol=1e-5,
                                   atol=1e-5)
    assert len(calls) == (len(RECORDS) if fused else 0)


def test_accuracy_picks_the_likeliest_ending_by_sum_and_by_mean(tmp_path):
    path = _hf_dir(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    by_sum, by_mean = [], []
    for c in RECORDS:
        scores = [_alone(model, tok, c.context, e) for e in c.endings]
        by_sum.append(Choice(c.context, c.endings, min(range(len(scores)),
                                                        key=lambda i: scores[i][0])))
        by_mean.append(Choice(c.context, c.endings, min(range(len(scores)),
                                                         key=lambda i: scores[i][0] / scores[i][1])))
    assert accuracy(model, tok, by_sum).acc == 1.0
    assert accuracy(model, tok, by_mean).acc_norm == 1.0
    wrong = [Choice(c.context, c.endings, (c.label + 1) % len(c.endings)) for c in by_sum]
    assert accuracy(model, tok, wrong).acc == 0.0


def test_command_reports_accuracy(tmp_path, capsys):
    path = _hf_dir(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"ctx": c.context, "endings": c.endings,
                                        "label": c.label}) + "\n" for c in RECORDS))
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(path), str(data), "--choices", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["examples"] == 3 and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("{not json", r"m.jsonl:1: not a multiple-choice record"),
    ('{"ctx": "a", "label": 0}', r"m.jsonl:1: not a multiple-choice record.*endings"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', r"m.jsonl:1: needs .*label indexing"),
    ('{"context": "a", "choices": ["b"], "label": 0}', r"2\+ non-empty endings"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(ChoicesError, match=message):
        read_choices(tmp_path / "m.jsonl")
