"""BlockLoader over prepared shards: determinism, rank disjointness, exact resume, boundaries."""

import json

import numpy as np
import pytest
import torch

from fastlm.data.format import FORMAT, FormatError, open_split, write_split
from fastlm.data.loader import IGNORE_INDEX, BlockLoader


def prepared(root, docs, *, masks=None, shard_tokens=1 << 28, vocab=1000):
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "dtype": "uint16", "vocab_size": vocab, "eos_id": 0,
            "tokenizer": "tokenizer", "sft": masks is not None,
            "splits": {"train": write_split(root, "train", docs, masks=masks,
                                            shard_tokens=shard_tokens)}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 1000, size=int(n))) + [0] for n in rng.integers(5, 60, 40)]
    # small shards so blocks straddle shard edges
    return prepared(tmp_path / "d", docs, shard_tokens=300), docs


def test_tokens_round_trip_across_shards(data):
    root, docs = data
    split = open_split(root, "train")
    assert len(split.shards) > 2
    flat = np.concatenate([np.asarray(s.tokens) for s in split.shards])
    assert flat.tolist() == [t for d in docs for t in d]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_targets_are_inputs_shifted(data, mode):
    root, docs = data
    flat = [t for d in docs for t in d]
    b = BlockLoader(root, 17, 3, mode=mode).batch_at(5)
    assert b.input_ids.shape == b.targets.shape == (3, 17)
    for x, y in zip(b.input_ids.tolist(), b.targets.tolist()):
        start = next(i for i in range(len(flat)) if flat[i:i + 17] == x and flat[i + 1:i + 18] == y)
        assert start >= 0


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_same_tokens_whatever_the_rank_and_micro_split(data, mode):
    """1 rank x micro 8 == 2 ranks x micro 4 == 1 rank x micro 2 (4 micro-steps)."""
    root, _ = data
    one = torch.cat([BlockLoader(root, 11, 8, mode=mode).batch_at(s).input_ids for s in range(3)])
    two = torch.cat([torch.cat([BlockLoader(root, 11, 4, rank=r, world_size=2, mode=mode)
                                .batch_at(s).input_ids for r in range(2)]) for s in range(3)])
    small = torch.cat([BlockLoader(root, 11, 2, mode=mode).batch_at(s).input_ids
                       for s in range(12)])
    assert torch.equal(one, two) and torch.equal(one, small)


def test_sequential_epoch_covers_every_block_once_across_ranks(data):
    root, _ = data
    t, world = 9, 3
    loaders = [BlockLoader(root, t, 2, rank=r, world_size=world, mode="sequential")
               for r in range(world)]
    nblocks = loaders[0]._nblocks
    starts = []
    for step in range(nblocks // (2 * world)):
        for ld in loaders:
            starts += [start for _, start in ld._rows(step)]
    assert len(starts) == len(set(starts))  # ranks never read the same block in an epoch
    assert set(starts) <= set(range(0, nblocks * t, t))


def test_deterministic_and_seed_dependent(data):
    root, _ = data
    a = BlockLoader(root, 16, 4, seed=1).batch_at(3).input_ids
    assert torch.equal(a, BlockLoader(root, 16, 4, seed=1).batch_at(3).input_ids)
    assert not torch.equal(a, BlockLoader(root, 16, 4, seed=2).batch_at(3).input_ids)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_is_exact(data, mode):
    root, _ = data
    ref = BlockLoader(root, 13, 4, mode=mode)
    expected = [next(ref).input_ids for _ in range(40)]  # several sequential epochs
    ld = BlockLoader(root, 13, 4, mode=mode)
    for _ in range(17):
        next(ld)
    state = ld.state_dict()
    resumed = BlockLoader(root, 13, 4, mode=mode)
    resumed.load_state_dict(state)
    for i in range(17, 40):
        assert torch.equal(next(resumed).input_ids, expected[i])


def test_resume_with_other_settings_is_refused(data):
    root, _ = data
    state = BlockLoader(root, 13, 4).state_dict()
    with pytest.raises(ValueError, match="block_size=13"):
        BlockLoader(root, 12, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BlockLoader(root, 13, 4, seed=5).load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_on_other_ranks_continues_at_the_same_sample(data, mode):
    """A run saved by 2 ranks x micro 4 resumes on 1 rank x micro 8 (or micro 2) where it
    stopped: the stream of samples does not depend on how it is split."""
    root, _ = data
    ranks = [BlockLoader(root, 11, 4, rank=r, world_size=2, mode=mode) for r in range(2)]
    for _ in range(3):
        for ld in ranks:
            next(ld)
    state = ranks[0].state_dict()  # 24 samples read
    want = torch.cat([ld.batch_at(3).input_ids for ld in ranks])  # the next 8
    one = BlockLoader(root, 11, 8, mode=mode)
    one.load_state_dict(state)
    assert one.step == 3 and torch.equal(next(one).input_ids, want)
    small = BlockLoader(root, 11, 2, mode=mode)
    small.load_state_dict(state)
    assert small.step == 12
    assert torch.equal(torch.cat([next(small).input_ids for _ in range(4)]), want)
    with pytest.raises(ValueError, match=r"24 samples were read \(2 ranks x micro-batch 4\), "
                                         r"not a whole number .*\(1 ranks x 5\)"):
        BlockLoader(root, 11, 5, mode=mode).load_state_dict(state)


def test_boundaries_restart_positions_at_documents(tmp_path):
    docs = [[5, 6, 7, 0], [8, 9, 0], [1, 2, 3, 4, 0]]
    root = prepared(tmp_path / "b", docs)
    ld = BlockLoader(root, 6, 1, mode="sequential", boundaries=True)
    ld._perm = lambda epoch: np.arange(ld._nblocks)  # first block: tokens 0..6
    b = ld.batch_at(0)
    assert b.input_ids[0].tolist() == [5, 6, 7, 0, 8, 9]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 4, 6] and b.max_seqlen == 4


def test_sft_mask_turns_prompt_targets_into_ignore(tmp_path):
    docs = [[1, 2, 3, 4, 0], [5, 6, 7, 0]]
    masks = [[0, 0, 1, 1, 1], [0, 1, 1, 1]]
    root = prepared(tmp_path / "s", docs, masks=masks)
    ld = BlockLoader(root, 8, 1, mode="sequential")
    ld._perm = lambda epoch: np.arange(ld._nblocks)
    b = ld.batch_at(0)
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 0, 5, 6, 7]
    # target j is token j+1, kept where that token's mask is 1
    assert b.targets[0].tolist() == [IGNORE_INDEX, 3, 4, 0, IGNORE_INDEX, 6, 7, 0]


def test_missing_and_corrupt_data_errors(tmp_path, data):
    with pytest.raises(FormatError, match="no meta.json.*fastlm prepare"):
        open_split(tmp_path / "nothing", "train")
    root, _ = data
    with pytest.raises(FormatError, match="no split 'val'"):
        open_split(root, "val")
    shard = root / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        open_split(root, "train")
    shard.unlink()
    with pytest.raises(FormatError, match="missing"):
        open_split(root, "train")


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    """Shards whose ids run past meta.json's vocabulary (damaged, or from another prepare):
    an error naming the split and the fix when a batch reads them, not an IndexError in the
    embedding; the evaluation's reader and the pairs' too."""
    from fastlm.train.evaluate import EvalError, token_stream

    root = prepared(tmp_path / "v", [[1, 2, 3, 0], [4, 999, 5, 0]], vocab=1000)
    ld = BlockLoader(root, 3, 2, mode="sequential")
    ld._perm = lambda epoch: np.arange(ld._nblocks)
    ld.batch_at(0)  # ids up to 999 of 1000: fine
    bad = prepared(tmp_path / "b", [[1, 2, 3, 0], [4, 1000, 5, 0]], vocab=1000)
    ld = BlockLoader(bad, 3, 1, mode="sequential")
    ld._perm = lambda epoch: np.arange(ld._nblocks)
    ld.batch_at(0)  # the block without it reads
    with pytest.raises(FormatError, match=r"split 'train' holds token id 1000, outside the "
                                          r"vocabulary of 1000 .*re-run `fastlm prepare`"):
        ld.batch_at(1)
    with pytest.raises(EvalError, match="token id 1000"):
        token_stream(bad, "train")


def test_block_longer_than_split(tmp_path):
    root = prepared(tmp_path / "t", [[1, 2, 0]])
    with pytest.raises(FormatError, match="fewer than block_size"):
        BlockLoader(root, 8, 1)
