"""Tokenizers for prepared data: always saved as a Hugging Face fast tokenizer directory, so
training, generation and the exported model all load the same one with transformers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fastlm.data.errors import DataError

EOS = "<|endoftext|>"
UNK = "<|unk|>"


def byte_level(path: str | Path):
    """256 byte tokens + EOS (id 256), no merges: a character-level tokenizer for ASCII text
    that can still encode anything."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _save(tok, path)


def char_level(texts: Iterable[str], path: str | Path):
    """One token per distinct character of ``texts`` (ids in code-point order), then EOS and an
    unknown token for characters the corpus never had: nanoGPT's character-level vocabulary
    (65 symbols for tiny shakespeare where bytes would be 257), as a Hugging Face tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise DataError("--tokenizer char: the training text is empty")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[EOS] = len(vocab)
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # every code point its own piece ([\s\S]: "." would leave newlines out)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces joined back with nothing between them
    return _save(tok, path, unk_token=UNK)


def byte_ids_table():
    """(256,) int64: token id of each byte value in :func:`byte_level`'s vocabulary, so byte
    tokenization is a table lookup on ``text.encode()`` (same ids as the tokenizer's)."""
    import numpy as np
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    index = {ch: i for i, ch in enumerate(alphabet)}
    return np.array([index[ch] for ch in _bytes_to_unicode()], dtype=np.int64)


def _bytes_to_unicode() -> list[str]:
    """The printable stand-in of each byte used by byte-level BPE (GPT-2's mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < 257 + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small for byte-level BPE (>= 258: "
                        f"256 bytes, EOS and at least one merge); use --tokenizer byte")


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path):
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _save(tok, path)


# what a model directory holds beside its tokenizer: never part of a tokenizer's files
_MODEL_FILES = {"config.json", "generation_config.json"}
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5",
                   ".onnx", ".index.json")


def tokenizer_files(src: str | Path) -> list[Path]:
    """The files of a tokenizer directory to copy: the model's config and weights left out,
    which a tokenizer directory prepared from a model directory before fastlm saved the
    tokenizer alone still holds (an export copying them overwrote the trained weights)."""
    return sorted(f for f in Path(src).iterdir()
                  if f.is_file() and f.name not in _MODEL_FILES
                  and not f.name.endswith(_MODEL_SUFFIXES))


def copy_pretrained(src: str | Path, path: str | Path):
    """A local Hugging Face tokenizer (a model's directory, usually) saved alone: the
    tokenizer's own files as transformers writes them, not the model's weights and config
    beside them. It must define an EOS token."""
    from transformers import AutoTokenizer

    src = Path(src)
    if not src.is_dir():
        raise DataError(f"tokenizer {src} is neither 'bpe', 'byte', 'char' nor a local "
                        f"tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:
        raise DataError(f"cannot load a tokenizer from {src}: {exc}") from exc
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {src} has no EOS token; documents are separated by EOS, "
                        f"so set one (tokenizer.eos_token) or use --tokenizer bpe")
    tok.save_pretrained(str(path))
    return tok


def _save(tok, path, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, **special)
    fast.save_pretrained(str(path))
    return fast


def load(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
