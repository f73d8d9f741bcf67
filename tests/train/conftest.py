"""A tiny prepared dataset (byte-level tokens of real English text) shared by the trainer tests."""

import json
import os
from pathlib import Path

import pytest

from fastlm.data.format import FORMAT, write_split
from fastlm.data.tokenizer import byte_level

REPO = Path(__file__).resolve().parents[2]


def make_dataset(root: Path, n_docs: int = 60) -> Path:
    """Paragraphs of pydoc's topic help as documents; every 10th document is validation."""
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    tok = byte_level(root / "tokenizer")
    texts = [t for t in topics.values() if len(t) > 400][:n_docs]
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    splits = {"train": write_split(root, "train", [d for i, d in enumerate(docs) if i % 10]),
              "val": write_split(root, "val", [d for i, d in enumerate(docs) if i % 10 == 0])}
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": len(tok),
            "eos_id": tok.eos_token_id, "tokenizer": "tokenizer", "sft": False,
            "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "pydoc")


@pytest.fixture
def child_env() -> dict:
    return fastlm_env()


def fastlm_env() -> dict:
    """Environment for child processes: this checkout importable, CPU accelerator."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env



@pytest.fixture(scope="module")
def launcher_env():
    """DeepSpeed's engine insists on launcher variables (RANK, LOCAL_RANK, ...), which an
    in-process world of one sets; restore the environment after the module so later tests
    that launch `deepspeed` subprocesses see a clean one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
