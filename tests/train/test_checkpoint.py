"""Which checkpoint a path names (run dir, checkpoints dir, tag dir, latest / best files)."""

import json
import re

import pytest
import torch

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


@pytest.fixture
def saved(tmp_path):
    """A checkpoint laid out as a 2-rank ZeRO save: model file, one optimizer file a rank,
    RNG files, the fastlm state."""
    d = tmp_path / "checkpoints" / "step00000004"
    d.mkdir(parents=True)
    torch.save({"w": torch.randn(64, 64)}, d / "mp_rank_00_model_states.pt")
    for r in range(2):
        torch.save({"m": torch.randn(4096)}, d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"rng": torch.get_rng_state()}, d / f"rng_rank{r}.pt")
    (d / "fastlm_state.json").write_text(json.dumps({"step": 4, "loader": {"world_size": 2}}))
    (d / ckpt.COMPLETE).touch()
    return d


def test_a_whole_checkpoint_passes_and_a_legacy_format_file_is_not_flagged(saved):
    assert ckpt.damaged_file(saved.parent, saved.name) is None
    torch.save({"x": 1}, saved / "rng_rank0.pt", _use_new_zipfile_serialization=False)
    assert ckpt.damaged_file(saved.parent, saved.name) is None


@pytest.mark.parametrize("damage, expected", [
    ("truncated", r"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is not a whole torch file"),
    ("empty", r"rng_rank1.pt is empty"),
    ("rank file deleted", r"saved by 2 ranks, and the optimizer state of rank\(s\) \[1\] is "
                          r"missing"),
    ("model file deleted", r"model state file \(\*model_states.pt\) is missing"),
    ("state cut", r"fastlm_state.json cannot be read"),
])
def test_a_damaged_checkpoint_names_the_file(saved, damage, expected):
    """Files of a COMPLETE checkpoint damaged afterwards (copied in part, a full disk, deleted):
    torch.load failed on one rank with no file named while the others hung in a collective."""
    optim = saved / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        data = optim.read_bytes()
        optim.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        (saved / "rng_rank1.pt").write_bytes(b"")
    elif damage == "rank file deleted":
        optim.unlink()
    elif damage == "model file deleted":
        (saved / "mp_rank_00_model_states.pt").unlink()
    else:
        text = (saved / "fastlm_state.json").read_text()
        (saved / "fastlm_state.json").write_text(text[:10])
    assert re.search(expected, ckpt.damaged_file(saved.parent, saved.name))
