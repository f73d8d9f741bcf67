"""`fastlm prepare --sft`: conversations rendered with a chat template, responses masked in."""

import json

import numpy as np
import pytest

from fastlm.data import DataError, prepare
from fastlm.data.chat import FASTLM_TEMPLATE, response_stop_ids
from fastlm.data.format import open_split
from fastlm.train.generate import load_tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And you?"},
        {"role": "assistant", "content": "Fine, thanks."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chatml_tokenizer(tmp_path, template=CHATML):
    """A byte-level tokenizer with ChatML's markers as special tokens and its template, as an
    instruct model's directory ships it."""
    from fastlm.data.tokenizer import byte_level

    tok = byte_level(tmp_path / "byte")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "chatml")
    return tmp_path / "chatml"


def documents(out, split="train"):
    sh = open_split(out, split).shards[0]
    toks, mask = np.asarray(sh.tokens), np.asarray(sh.mask)
    return [(toks[a:b], mask[a:b]) for a, b in zip(sh.doc_starts[:-1], sh.doc_starts[1:])]


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_fastlm_template_trains_every_response_and_its_eos(tmp_path, kind):
    rows = [{"messages": CHAT, "n": i} for i in range(3)] + \
        [{"prompt": f"What is {i}+{i}?", "response": f"It is {2 * i}."} for i in range(3)]
    out = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tmp_path / "o", tokenizer=kind,
                  vocab_size=300, sft=True, val_fraction=0.0, dedup=False, progress=False)
    tok = load_tokenizer(out)
    assert tok.chat_template == FASTLM_TEMPLATE  # saved for generation and the export
    docs = documents(out)
    assert len(docs) == 6
    for toks, mask in docs:
        text = tok.decode(toks)
        trained = tok.decode(toks[mask == 1])
        eos = tok.eos_token
        if "Hello." in text:  # every assistant turn, each ending with EOS; nothing else
            assert text == tok.apply_chat_template(CHAT, tokenize=False)
            assert trained == f"Hello.{eos}Fine, thanks.{eos}"
            assert (toks == tok.eos_token_id).sum() == 2
        else:
            assert text.startswith("<|user|>\nWhat is") and "<|assistant|>\nIt is" in text
            assert trained.startswith("It is") and trained.endswith(f".{eos}")
            assert toks[-1] == tok.eos_token_id and mask[-1] == 1


def test_a_tokenizers_own_chat_template_is_used_and_kept(tmp_path):
    """An instruct model's tokenizer: its template lays out the conversation, the responses
    are trained with their end-of-turn marker, its special tokens are single ids."""
    src = chatml_tokenizer(tmp_path)
    out = prepare([write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])], tmp_path / "o",
                  tokenizer=str(src), sft=True, val_fraction=0.0, progress=False)
    tok = load_tokenizer(out)
    assert tok.chat_template == CHATML
    [(toks, mask)] = documents(out)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (toks == start).sum() == 5 and (toks == end).sum() == 5
    assert tok.decode(toks) == tok.apply_chat_template(CHAT, tokenize=False)
    trained = tok.decode(toks[mask == 1])
    assert trained == "Hello.<|im_end|>\nFine, thanks.<|im_end|>\n"
    assert response_stop_ids(tok) == [end]
    # asked for fastlm's layout instead: that one is saved over the tokenizer's
    out2 = prepare([tmp_path / "c.jsonl"], tmp_path / "o2", tokenizer=str(src), sft=True,
                   val_fraction=0.0, progress=False, chat_template="fastlm")
    assert load_tokenizer(out2).chat_template == FASTLM_TEMPLATE


def test_a_template_file_and_its_edits(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    out = prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                  progress=False, chat_template=str(template))
    tok = load_tokenizer(out)
    assert tok.chat_template == CHATML
    [(toks, mask)] = documents(out)
    assert tok.decode(toks[mask == 1]) == "Hello.<|im_end|>\nFine, thanks.<|im_end|>\n"
    template.write_text(CHATML.replace("<|im_end|>", "<|end|>"))  # not "up to date" now
    with pytest.raises(DataError, match="exists .*--overwrite"):
        prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                progress=False, chat_template=str(template))


# Qwen3-like: an earlier answer is rendered cut short once later turns follow (Qwen3 drops its
# reasoning), so its characters are not in the whole conversation's rendering
REWRITES = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
            "{{ '<a>' + m['content'][:2] + '\\n' }}{% else %}{{ '<' + m['role'][0] + '>' + "
            "m['content'] + '\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<a>' }}{% endif %}")


def test_a_template_that_rewrites_earlier_turns_splits_the_conversation(tmp_path, caplog):
    """One example per assistant turn, that turn last and alone trained, announced once."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    (tmp_path / "t.jinja").write_text(REWRITES)
    with caplog.at_level("WARNING", logger="fastlm"):
        out = prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                      split="tail", dedup=False, progress=False,
                      chat_template=str(tmp_path / "t.jinja"))
    assert caplog.text.count("1 multi-turn record(s) were split") == 1
    tok = load_tokenizer(out)
    got = [(tok.decode(t), tok.decode(t[m == 1])) for t, m in documents(out)]
    assert got == [("<s>Be brief.\n<u>Hi?\n<a>Hello.\n", "Hello.\n"),
                   ("<s>Be brief.\n<u>Hi?\n<a>He\n<u>And you?\n<a>Fine, thanks.\n",
                    "Fine, thanks.\n"),
                   ("<u>Hi?\n<a>Hello.\n", "Hello.\n")]


@pytest.mark.parametrize("template, message", [
    # the generation prompt is not how an answer begins: no answer can be found
    ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<bot>' }}{% endif %}",
     r"fine-tuning record 0 .*does not render message 2 as the continuation of its "
     r"generation prompt.*--chat-template fastlm"),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
     "{% endif %}",
     r"fine-tuning record 0 .*: the chat template .* failed: .*no system role"),
])
def test_a_template_that_hides_the_responses_is_an_error(tmp_path, template, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    (tmp_path / "t.jinja").write_text(template)
    with pytest.raises(DataError, match=message):
        prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                progress=False, chat_template=str(tmp_path / "t.jinja"))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".tmp-*"))


def test_bad_records_and_choices(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(DataError, match="record 0: a message without a role"):
        prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                progress=False)
    with pytest.raises(DataError, match="neither 'auto', 'fastlm' nor a Jinja template file"):
        prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                progress=False, chat_template="chatml")


def test_content_parts_are_joined(tmp_path):
    """OpenAI's layout may give a message's content as a list of parts: the text ones count."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": parts}]}])
    out = prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                  progress=False)
    tok = load_tokenizer(out)
    [(toks, mask)] = documents(out)
    assert tok.decode(toks) == f"<|user|>\nHi?\n<|assistant|>\nHello there.{tok.eos_token}"


def test_sharegpt_alpaca_and_messages_files_together(tmp_path):
    """The common layouts of fine-tuning sets, one file each, read as the same conversations."""
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[1:3], "id": 1}])
    write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Yo?"},
        {"from": "gpt", "value": "Hey."}]}])
    write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "2+2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hi!"}])
    out = prepare([tmp_path / "chat.jsonl", tmp_path / "sharegpt.jsonl",
                   tmp_path / "alpaca.jsonl"], tmp_path / "o", tokenizer="byte", sft=True,
                  val_fraction=0.0, split="tail", progress=False)
    tok = load_tokenizer(out)
    eos = tok.eos_token
    texts = sorted(tok.decode(t) for t, _ in documents(out))
    assert texts == sorted([
        f"<|user|>\nHi?\n<|assistant|>\nHello.{eos}",
        f"<|system|>\nBe brief.\n<|user|>\nYo?\n<|assistant|>\nHey.{eos}",
        f"<|user|>\nAdd.\n\n2+2\n<|assistant|>\n4{eos}",
        f"<|user|>\nGreet.\n<|assistant|>\nHi!{eos}"])


@pytest.mark.parametrize("rows, message", [
    ([{"text": "plain"}], r"need one of: a 'messages' list .*found columns \['text'\]"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}],
     r"record 1: a fine-tuning record with none of the layouts filled"),
    ([{"conversations": [{"from": "human"}, {"value": "x"}]}],
     r"record 0: a message without a role"),
    ([{"messages": "hello"}], r"record 0: 'messages' is not a list"),
    ([{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}],
     r"record 0: a message with 'image' content; fastlm fine-tunes on text"),
])
def test_records_in_no_known_layout(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=message):
        prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_fine_tuning_records_stream_through_the_disk(tmp_path, monkeypatch, kind):
    """Rendered conversations (or pairs) go to an Arrow file of the build directory, read back
    memory-mapped (no Arrow memory allocated for them), and are tokenized a few characters at a
    time: the shards are byte for byte those of records written and encoded in one batch."""
    import pyarrow as pa

    from fastlm.data import pipeline

    if kind == "sft":
        rows = [{"messages": CHAT, "n": i} for i in range(5)] + \
            [{"prompt": f"What is {i}+{i}?", "response": f"It is {2 * i}." * (i + 1)}
             for i in range(40)]
    else:
        rows = [{"prompt": f"Say yes {i}?", "chosen": "Yes." * (i % 4 + 1), "rejected": "No!"}
                for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    kw = dict(tokenizer="byte", val_fraction=0.2, progress=False, **{kind: True})
    whole = prepare([path], tmp_path / "whole", **kw)
    written = []
    real = pipeline._Records.write.__func__

    def write(cls, records, scratch):
        before = pa.total_allocated_bytes()
        docs = real(cls, records, scratch)
        written.append((docs.n, pa.total_allocated_bytes() - before))
        return docs

    monkeypatch.setattr(pipeline._Records, "write", classmethod(write))
    monkeypatch.setattr(pipeline._Records, "_BATCH", 3)  # many record batches in the file
    monkeypatch.setattr(pipeline, "_ENCODE_CHARS", 50)  # a few records a tokenizer call
    monkeypatch.setattr(pipeline, "_TOKENIZE_BATCH", 7)
    parts = prepare([path], tmp_path / "parts", **kw)
    assert written[0][0] == len(rows) and written[0][1] == 0  # memory-mapped
    names = sorted(p.name for p in whole.iterdir() if p.suffix in (".bin", ".npy"))
    assert names == sorted(p.name for p in parts.iterdir() if p.suffix in (".bin", ".npy"))
    assert any(n.endswith(".mask.bin") for n in names)
    for name in names:
        assert (whole / name).read_bytes() == (parts / name).read_bytes(), name
