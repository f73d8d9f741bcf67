"""fastlm eval: loss and perplexity of a model over every token of a prepared split or a text
file, against the same sums computed here with transformers' own forward and F.cross_entropy."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from fastlm import cli
from fastlm.data.format import FORMAT, open_split, write_split
from fastlm.data.tokenizer import byte_level
from fastlm.train.evaluate import evaluate, token_stream, windows


def _hf_dir(tmp_path, kind="gpt2", **extra):
    dims = (dict(n_embd=32, n_layer=2, n_head=2, n_positions=64) if kind == "gpt2" else
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64))
    conf = AutoConfig.for_model(kind, vocab_size=257, bos_token_id=256, eos_token_id=256,
                                **dims, **extra)
    torch.manual_seed(0)
    path = tmp_path / kind
    AutoModelForCausalLM.from_config(conf).save_pretrained(path)
    byte_level(path)  # the data's tokenizer (tests/train/conftest.py)
    return path


def _reference(model, tokens, block, stride, keep=None):
    """transformers' guide to sliding-window perplexity, one window at a time."""
    model.eval()
    total, count, scored_to, begin = 0.0, 0, 0, 0
    n = len(tokens)
    while scored_to < n - 1:
        end = min(begin + block, n - 1)
        ids = torch.tensor(tokens[begin:end])[None]
        tgt = torch.tensor(tokens[begin + 1:end + 1])
        valid = torch.arange(begin + 1, end + 1) > scored_to
        if keep is not None:
            valid &= torch.from_numpy(keep[begin + 1:end + 1] == 1)
        with torch.no_grad():
            logits = model(ids).logits[0]
        total += F.cross_entropy(logits[valid], tgt[valid], reduction="sum").item()
        count += int(valid.sum())
        scored_to, begin = end, begin + stride
    return total / count, count


def test_windows_score_every_target_once():
    for n, block, stride in [(2, 5, 5), (100, 16, 16), (100, 16, 5), (37, 8, 1), (17, 16, 16)]:
        scored = []
        for b, e, first in windows(n, block, stride):
            assert e - b <= block and first < e - b
            scored += list(range(b + 1 + first, e + 1))
        assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [None, 7])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_equals_transformers_forward(tmp_path, tiny_data, kind, stride):
    model = AutoModelForCausalLM.from_pretrained(_hf_dir(tmp_path, kind))
    tokens, keep = token_stream(tiny_data, "val")
    tokens = tokens[:700]  # not a multiple of the block
    want, count = _reference(model, tokens, 32, stride or 32)
    import fastlm

    fastlm.patch(model)  # the kernels, as the command runs them
    got = evaluate(model, tokens, keep, block_size=32, stride=stride, batch_size=4,
                   progress=False)
    assert got.tokens == count == len(tokens) - 1
    assert got.loss == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    unfused = evaluate(model, tokens, keep, block_size=32, stride=stride, batch_size=4,
                       progress=False, fused=False)
    assert unfused.loss == pytest.approx(want, rel=1e-5) and unfused.tokens == count


def test_sft_data_scores_responses_only(tmp_path):
    tok_dir = tmp_path / "sft"
    tok_dir.mkdir()
    byte_level(tok_dir / "tokenizer")
    docs, masks = [], []
    for i in range(30):
        prompt, response = list(f"q{i}?".encode()), list(f"a{i}.".encode()) + [256]
        docs.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": 257, "eos_id": 256, "tokenizer": "tokenizer",
            "sft": True, "splits": {"val": write_split(tok_dir, "val", docs, masks=masks)}}
    (tok_dir / "meta.json").write_text(json.dumps(meta))
    model = AutoModelForCausalLM.from_pretrained(_hf_dir(tmp_path))
    tokens, keep = token_stream(tok_dir, "val")
    assert keep is not None and 0 < keep.sum() < len(keep)
    want, count = _reference(model, tokens, 16, 16, keep)
    got = evaluate(model, tokens, keep, block_size=16, progress=False)
    assert got.tokens == count < len(tokens) - 1
    assert got.loss == pytest.approx(want, rel=1e-5)
    assert open_split(tok_dir, "val").shards[0].mask is not None


def test_command_on_a_split_and_on_a_text_file(tmp_path, tiny_data, capsys):
    hf = _hf_dir(tmp_path)
    out = tmp_path / "result.json"
    assert cli.main(["eval", str(hf), str(tiny_data), "--block-size", "32", "--max-tokens",
                     "500", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tokens"] == 499 and res["windows"] == 16 and res["split"] == "val"
    assert "perplexity" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokens, _ = token_stream(tiny_data, "val")
    want, _ = _reference(model, tokens[:500], 32, 32)
    assert res["loss"] == pytest.approx(want, rel=1e-5)
    # a text file, encoded with the model's tokenizer
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert cli.main(["eval", str(hf), str(text), "--json", str(out), "--stride", "16",
                     "--block-size", "32"]) == 0
    from fastlm.train.generate import load_tokenizer

    ids = np.asarray(load_tokenizer(hf)(text.read_text()).input_ids)
    want, count = _reference(model, ids, 32, 16)
    res = json.loads(out.read_text())
    assert res["tokens"] == count and res["loss"] == pytest.approx(want, rel=1e-5)
    # bits per byte: one byte a token here (byte-level), so the nats of every scored target,
    # in bits, over the text's bytes after the first
    assert res["bytes"] == len(text.read_bytes()) - 1 == count
    assert res["bits_per_byte"] == pytest.approx(want * count / math.log(2) / res["bytes"])
    assert "bits/byte" in capsys.readouterr().out
    # the same text gzipped, as prepare takes corpora: the same result
    import gzip

    packed = tmp_path / "t.txt.gz"
    packed.write_bytes(gzip.compress(text.read_bytes()))
    out2 = tmp_path / "result2.json"
    assert cli.main(["eval", str(hf), str(packed), "--json", str(out2), "--stride", "16",
                     "--block-size", "32"]) == 0
    assert json.loads(out2.read_text())["loss"] == res["loss"]


def test_bf16_command_keeps_rope_frequencies_fp32(tmp_path, tiny_data, monkeypatch):
    """`fastlm eval --dtype bf16` cast the model with .to(bf16), rotary inv_freq included (RoPE
    angles off by radians deep into a long context); it runs the model transformers builds in
    bf16, whose inv_freq stays fp32."""
    import fastlm.train.evaluate as fevaluate

    seen = []
    real = fevaluate.evaluate
    monkeypatch.setattr(fevaluate, "evaluate", lambda model, *a, **k: seen.append(
        dict(model.named_buffers())) or real(model, *a, **k))
    hf = _hf_dir(tmp_path, "llama")
    assert cli.main(["eval", str(hf), str(tiny_data), "--block-size", "32", "--max-tokens",
                     "200", "--dtype", "bf16", "--no-kernels"]) == 0
    assert seen[0]["model.rotary_emb.inv_freq"].dtype == torch.float32


def test_command_errors_name_the_problem(tmp_path, tiny_data, capsys):
    import shutil

    hf = _hf_dir(tmp_path)
    no_val = tmp_path / "no_val"
    shutil.copytree(tiny_data, no_val)
    meta = json.loads((no_val / "meta.json").read_text())
    meta["splits"]["val"]["shards"] = []
    (no_val / "meta.json").write_text(json.dumps(meta))
    cases = [
        ([str(hf), str(tmp_path / "nope")], "not found"),
        ([str(tmp_path / "nomodel"), str(tiny_data)], "not found"),
        ([str(hf), str(tiny_data), "--block-size", "65"], "outside the model's context (1..64)"),
        ([str(hf), str(tiny_data), "--block-size", "16", "--stride", "17"],
         "--stride must be between 1 and the block size (16)"),
        ([str(hf), str(tiny_data), "--split", "test"], "no split 'test'"),
        # data prepared without a validation split: the split to evaluate instead is named
        ([str(hf), str(no_val)], "split 'val' has no tokens; prepare more data (or evaluate "
                                 "another split: --split train)"),
    ]
    for args, message in cases:
        assert cli.main(["eval", *args]) == 2, args
        assert message in capsys.readouterr().err, (args, message)


def test_data_from_another_tokenizer_is_refused(tmp_path, tiny_data, capsys):
    import shutil

    from fastlm.data.tokenizer import char_level

    hf = _hf_dir(tmp_path)
    char_level(["abc"], tmp_path / "char")
    for f in (tmp_path / "char").iterdir():
        shutil.copy(f, hf / f.name)  # the model now ships a char-level tokenizer
    assert cli.main(["eval", str(hf), str(tiny_data)]) == 2
    assert "tokenized with another vocabulary than the model" in capsys.readouterr().err


def test_scored_bytes_follow_the_sft_mask_and_skip_special_tokens(tmp_path):
    from fastlm.train.evaluate import scored_bytes

    tok = byte_level(tmp_path / "tok")
    ids = np.asarray(tok("héllo").input_ids + [tok.eos_token_id] + tok("ab").input_ids)
    # every target after the first: "éllo" (5 bytes: é is 2), EOS (no text), "ab"
    assert scored_bytes(ids, None, tok) == 5 + 2
    keep = np.zeros(len(ids), np.int8)
    keep[-2:] = 1  # only "ab" is trained on
    assert scored_bytes(ids, keep, tok) == 2
