"""fastlm generate's sampling: past the model's context (GPT-2's learned positions end there;
an index past them crashed with an IndexError) it continues from the last half-context."""

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastlm.train.generate import context_length, sample_ids


def _model(n_positions):
    conf = AutoConfig.for_model("gpt2", vocab_size=300, n_embd=32, n_layer=1, n_head=2,
                                n_positions=n_positions, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    model.generation_config.eos_token_id = None  # never stop early: count every token
    return model


def _greedy(model, ids, n):
    return sample_ids(model, ids, max_new_tokens=n, temperature=0.0, top_k=None, top_p=None,
                      pad_token_id=0)


def test_sampling_runs_past_the_context_window(caplog):
    model = _model(16)
    assert context_length(model) == 16
    calls = []
    real = model.generate
    model.generate = lambda ids, **kw: calls.append(ids.shape[1]) or real(ids, **kw)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        out = _greedy(model, prompt, 40)
    assert out.shape == (1, 45) and torch.equal(out[:, :5], prompt)
    # the first window takes the prompt, every later one the last 8 tokens
    assert calls[0] == 5 and set(calls[1:]) == {8} and len(calls) > 2
    assert sum("context of 16 tokens" in r.message for r in caplog.records) == 1
    # the first window is plain generate from the prompt
    model.generate = real
    assert torch.equal(out[:, :16], real(prompt, max_new_tokens=11, do_sample=False,
                                         pad_token_id=0))


def test_prompt_longer_than_the_context():
    model = _model(16)
    prompt = torch.arange(1, 31)[None]
    out = _greedy(model, prompt, 3)
    assert out.shape == (1, 33) and torch.equal(out[:, :30], prompt)


def test_chat_without_a_chat_template_says_why(tmp_path):
    """--chat on a model whose data was prepared without --sft: the tokenizer has no chat
    template, and the error says so instead of inventing a layout."""
    import pytest

    from fastlm.data.tokenizer import byte_level
    from fastlm.train.generate import GenerateError, sample

    tok = byte_level(tmp_path / "tok")
    with pytest.raises(GenerateError, match="no chat template .*fastlm prepare --sft"):
        sample(_model(16), tok, "Hi?", max_new_tokens=2, chat=True)
