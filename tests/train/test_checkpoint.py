"""Which checkpoint a path names (run dir, checkpoints dir, tag dir, latest / best files)."""

import pytest

from fastlm.train import checkpoint as ckpt


@pytest.fixture
def ckpts(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for tag in ("step00000002", "step00000004", "step00000006"):
        (d / tag).mkdir(parents=True)
        (d / tag / ckpt.COMPLETE).touch()
    (d / "latest").write_text("step00000006")
    (d / "best").write_text("step00000002\n")
    return d


def test_paths_name_their_checkpoint(ckpts):
    run = ckpts.parent
    assert ckpt.resolve(run) == (ckpts, "step00000006")
    assert ckpt.resolve(ckpts) == (ckpts, "step00000006")
    assert ckpt.resolve(ckpts / "latest") == (ckpts, "step00000006")
    assert ckpt.resolve(ckpts / "best") == (ckpts, "step00000002")
    assert ckpt.resolve(ckpts / "step00000004") == (ckpts, "step00000004")


def test_a_pointer_to_an_incomplete_or_missing_checkpoint_is_named(ckpts):
    (ckpts / "step00000002" / ckpt.COMPLETE).unlink()
    with pytest.raises(RuntimeError, match="best names step00000002, which is not a complete"):
        ckpt.resolve(ckpts / "best")
    with pytest.raises(FileNotFoundError, match="no checkpoint found.*checkpoints/best"):
        ckpt.resolve(ckpts / "step00000002")
