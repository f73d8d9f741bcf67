"""fastlm generate's sampling: past the model's context (GPT-2's learned positions end there;
an index past them crashed with an IndexError) it continues from the last half-context."""

import logging
import re

import pytest
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


def _lm(kind, n_positions=64):
    conf = (AutoConfig.for_model("gpt2", vocab_size=300, n_embd=32, n_layer=2, n_head=2,
                                 n_positions=n_positions, bos_token_id=256, eos_token_id=256)
            if kind == "gpt2" else
            AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=n_positions, bos_token_id=256,
                                 eos_token_id=256))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf).eval()


PROMPTS = ["a", "hello there", "xyz!", "0123456789abcdef", "Q"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_batch_completes_each_prompt_as_alone(tmp_path, kind):
    """Left-padded prompts of different lengths in one generate call: greedy, each completion
    is what the prompt alone gives (GPT-2's learned positions and Llama's rotary ones count
    from each row's first real token)."""
    from fastlm.data.tokenizer import byte_level
    from fastlm.train.generate import complete_batch, sample

    tok = byte_level(tmp_path / "tok")
    model = _lm(kind)
    batch = complete_batch(model, tok, PROMPTS, max_new_tokens=7, temperature=0)
    for prompt, text in zip(PROMPTS, batch):
        assert sample(model, tok, prompt, max_new_tokens=7, temperature=0) == prompt + text
    assert any(text for text in batch)


def test_a_batch_crops_each_row_where_it_would_alone(tmp_path, caplog):
    """Rows pass the context at different steps (a prompt longer than it, a short one): each
    goes on from its last half-context exactly where it would alone, so greedy completions
    equal the prompts' own; one warning."""
    from fastlm.data.tokenizer import byte_level
    from fastlm.train.generate import complete_batch, sample

    tok = byte_level(tmp_path / "tok")
    model = _lm("gpt2", n_positions=16)
    model.generation_config.eos_token_id = None  # never stop early: count every token
    prompts = ["abcdefghijklmnopqrstuvwxyz", "ab", "0123456789"]
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        got = complete_batch(model, tok, prompts, max_new_tokens=30, temperature=0)
    assert sum("the model's context of 16 tokens" in r.message for r in caplog.records) == 1
    for prompt, text in zip(prompts, got):
        assert sample(model, tok, prompt, max_new_tokens=30, temperature=0) == prompt + text


def test_generation_crops_at_the_context_a_run_trained(caplog):
    """A model whose fastlm run trained it on blocks of 8 (its config notes them; its position
    table holds 16): sampling goes on from the last 4 tokens each time it reaches 8, as it
    does at a physical context of 8, instead of reading positions it never learned."""
    from fastlm.train.model import TRAINED_CONTEXT

    model = _model(16)
    setattr(model.config, TRAINED_CONTEXT, 8)
    assert context_length(model, trained=True) == 8 and context_length(model) == 16
    calls = []
    real = model.generate
    model.generate = lambda ids, **kw: calls.append(ids.shape[1]) or real(ids, **kw)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        out = _greedy(model, torch.tensor([[5, 6, 7]]), 20)
    assert out.shape == (1, 23) and calls[0] == 3 and set(calls[1:]) == {4}
    (warning,) = [r.message for r in caplog.records if "context" in r.message]
    assert "the context the model was trained on (its blocks) of 8 tokens" in warning


def _model_dir(tmp_path):
    from fastlm.data.tokenizer import byte_level

    path = tmp_path / "model"
    _lm("llama").save_pretrained(path)
    byte_level(path)
    return path


def test_generate_prompts_file_writes_every_completion(tmp_path, capsys, monkeypatch):
    import json

    from fastlm.cli import main
    from fastlm.train import generate

    path = _model_dir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                               for i, p in enumerate(PROMPTS)) + "\n")
    out = tmp_path / "out" / "completions.jsonl"
    argv = ["generate", str(path), "--prompts", str(prompts), "--out", str(out),
            "--temperature", "0", "--max-new-tokens", "5", "--num-samples", "2",
            "--batch-size", "3"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, k) for p in PROMPTS for k in (0, 1)]
    from fastlm._fs import umask

    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's 0600
    model, tok = generate.load_for_generation(path)
    for r in rows:  # greedy: both samples are the prompt's own completion
        assert generate.sample(model, tok, r["prompt"], max_new_tokens=5, temperature=0) == \
            r["prompt"] + r["completion"]
    # a text file, a prompt a line, to stdout
    (tmp_path / "prompts.txt").write_text("a\n\nQ\n")
    assert main(["generate", str(path), "--prompts", str(tmp_path / "prompts.txt"),
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in printed] == ["a", "Q"]
    assert [r["completion"] for r in printed] == [rows[0]["completion"], rows[-1]["completion"]]
    # a failure midway leaves neither the output nor a temporary file behind
    calls = []
    real = generate.complete_batch
    monkeypatch.setattr(generate, "complete_batch", lambda *a, **k: (
        calls.append(1), real(*a, **k) if len(calls) < 2 else 1 / 0)[1])
    with pytest.raises(ZeroDivisionError):
        main(argv[:5] + [str(tmp_path / "fail.jsonl")] + argv[6:])
    assert sorted(p.name for p in tmp_path.iterdir() if "fail" in p.name) == []


def test_interactive_completes_each_line_of_a_base_model(tmp_path, capsys, monkeypatch):
    """--interactive without --chat: a prompt a line on stdin, each printed with its own
    completion (what --prompt prints), none carried into the next; /exit ends."""
    import io

    from fastlm.cli import main
    from fastlm.train import generate

    path = _model_dir(tmp_path)
    args = ["--temperature", "0", "--max-new-tokens", "5"]
    alone = []
    for p in ("a b", " Q"):
        assert main(["generate", str(path), "--prompt", p, *args]) == 0
        alone.append(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("a b\n\n Q\n/exit\na b\n"))
    assert main(["generate", str(path), "--interactive", *args]) == 0
    assert capsys.readouterr().out == "".join(alone)
    model, tok = generate.load_for_generation(path)
    assert alone[1] == generate.sample(model, tok, " Q", max_new_tokens=5, temperature=0) + "\n"


@pytest.mark.parametrize("content, extra, message", [
    ('{"prompt": "a"}\nnot json\n', [], r"prompts.jsonl:2 is not JSON"),
    ('{"text": "a"}\n', [], r"prompts.jsonl:1 has no string 'prompt'"),
    ("\n", [], "holds no prompt"),
    ('{"prompt": "a"}\n', ["--prompt", "b"], "drop --prompt"),
])
def test_bad_prompt_files_are_named(tmp_path, capsys, content, extra, message):
    from fastlm.cli import main

    path = _model_dir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(content)
    assert main(["generate", str(path), "--prompts", str(tmp_path / "prompts.jsonl"),
                 *extra]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_out_without_prompts_and_a_missing_file_are_refused(tmp_path, capsys):
    from fastlm.cli import main

    path = _model_dir(tmp_path)
    assert main(["generate", str(path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--out writes the completions of --prompts FILE" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err


def _chat_tokenizer(path):
    from fastlm.data.tokenizer import byte_level

    tok = byte_level(path)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tok


def test_chat_prompts_may_be_conversations(tmp_path):
    """--chat: a prompt is a user's message or a conversation ending in one; each reply in
    the batch is the one sample() gives with the earlier messages as its history."""
    from fastlm.train.generate import complete_batch, sample

    tok = _chat_tokenizer(tmp_path / "tok")
    model = _lm("llama")
    conversation = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey."},
                    {"role": "user", "content": "And?"}]
    prompts = ["Hi?", conversation, [{"role": "user", "content": "x"}]]
    got = complete_batch(model, tok, prompts, max_new_tokens=6, temperature=0, chat=True,
                         system="Be brief.")
    system = [{"role": "system", "content": "Be brief."}]
    want = [sample(model, tok, "Hi?", max_new_tokens=6, temperature=0, chat=True, history=system),
            sample(model, tok, "And?", max_new_tokens=6, temperature=0, chat=True,
                   history=system + conversation[:2]),
            sample(model, tok, "x", max_new_tokens=6, temperature=0, chat=True, history=system)]
    assert got == want and all(got)


@pytest.mark.parametrize("record, extra, message", [
    ({"messages": [{"role": "user", "content": "a"}]}, [], "add --chat"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     ["--chat"], r"prompts.jsonl:1: 'messages' must be .* ending in the user's"),
    ({"messages": "hi"}, ["--chat"], "'messages' must be a list"),
])
def test_bad_conversation_prompts_are_named(tmp_path, capsys, record, extra, message):
    import json

    from fastlm.cli import main

    path = _model_dir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["generate", str(path), "--prompts", str(tmp_path / "prompts.jsonl"),
                 *extra]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_console_streams_the_text_sample_returns(tmp_path):
    """on_text gets the text as it is generated; its pieces add up to what sample returns:
    the prompt and its completion, across the windows of a context of 16 (every window puts
    its context first: only the prompt's is shown) and through characters cut between byte
    tokens; for a chat model the reply alone."""
    from fastlm.data.tokenizer import byte_level
    from fastlm.train.generate import sample

    tok = byte_level(tmp_path / "tok")
    model = _lm("gpt2", n_positions=16)
    model.generation_config.eos_token_id = None  # never stop early: count every token
    for prompt in ("hello", "h\u00e9llo \u4e2d"):
        pieces = []
        text = sample(model, tok, prompt, max_new_tokens=40, temperature=0,
                      on_text=pieces.append)
        assert "".join(pieces) == text, pieces
        # token by token where they make characters (this random model's bytes often do not:
        # those come at the end, as bytes that never made a character)
        assert len(pieces) > 10 or prompt != "hello", pieces
    chat_tok = _chat_tokenizer(tmp_path / "chat")
    chat_model = _lm("llama", n_positions=64)
    pieces = []
    reply = sample(chat_model, chat_tok, "Hi?", max_new_tokens=12, temperature=0, chat=True,
                   on_text=pieces.append)
    assert "".join(pieces) == reply and "Hi?" not in reply


def test_generate_runs_in_the_device_and_dtype_asked_for(tmp_path, monkeypatch, capsys):
    """fastlm generate always ran on the CPU in the checkpoint's dtype, GPU or not; it takes
    eval's --device/--dtype (default: the GPU in bf16 where there is one)."""
    from fastlm.cli import main
    from fastlm.train import evaluate, generate

    path = _model_dir(tmp_path)
    seen = []
    real = generate.sample
    monkeypatch.setattr(generate, "sample", lambda model, *a, **k: seen.append(
        next(model.parameters()).dtype) or real(model, *a, **k))
    assert main(["generate", str(path), "--prompt", "a", "--max-new-tokens", "2",
                 "--dtype", "bf16"]) == 0
    assert seen == [torch.bfloat16]
    assert main(["generate", str(path), "--prompt", "a", "--max-new-tokens", "2",
                 "--device", "cuda:7"]) == 2
    assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    assert evaluate.device_and_dtype(None, None) == (torch.device("cuda"), torch.bfloat16)
    # a V100 or T4 (bf16 only emulated: torch's is_bf16_supported() says yes) runs fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 5))
    assert evaluate.device_and_dtype(None, None) == (torch.device("cuda"), torch.float32)
    assert evaluate.device_and_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
