"""MixedLoader (data.mix): exact proportions, each source read as alone, rank- and
micro-batch-independent, exactly resumable; bad mixes named."""

import numpy as np
import pytest
import torch
from test_loader import prepared

from fastlm.data.format import FormatError
from fastlm.data.loader import IGNORE_INDEX, BlockLoader
from fastlm.data.mix import MixedLoader


def _docs(low, high, seed, n=30):
    """Documents whose tokens lie in [low, high): a row's tokens tell which source it is."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(low, high, size=int(k))) + [0] for k in rng.integers(5, 60, n)]


@pytest.fixture
def sources(tmp_path):
    a = prepared(tmp_path / "a", _docs(1, 500, 0))
    b = prepared(tmp_path / "b", _docs(500, 1000, 1, n=8))  # small: its epochs repeat
    return str(a), str(b)


def _source_of(row: torch.Tensor) -> str:
    body = row[row != 0]
    assert (body < 500).all() or (body >= 500).all(), "a row mixes sources"
    return "a" if (body < 500).all() else "b"


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_each_chunk_holds_the_weights_exactly_and_each_source_is_read_as_alone(sources, mode):
    a, b = sources
    mix = MixedLoader({a: 3, b: 1}, 8, 64, seed=5, mode=mode)
    chunk = MixedLoader._CHUNK
    rows = [r for step in range(chunk // 64) for r in mix._rows(step)]
    picked = {a: [s for src, s in rows if src.split is mix.sources[0].split],
              b: [s for src, s in rows if src.split is mix.sources[1].split]}
    assert (len(picked[a]), len(picked[b])) == (3 * chunk // 4, chunk // 4)
    # a source's samples in the mix are its own loader's 0, 1, 2, ... (seed + its index)
    for i, path in enumerate((a, b)):
        alone = BlockLoader(path, 8, 1, seed=5 + i, mode=mode)
        assert picked[path] == [alone._sample_start(k) for k in range(len(picked[path]))]
    # the order is shuffled, not blocks of one source
    first = [src is mix.sources[0] for src, _ in rows[:64]]
    assert 0 < sum(first) < 64
    # and the batch's tokens are the sources' own (targets = inputs shifted)
    batch = mix.batch_at(3)
    assert {_source_of(r) for r in batch.input_ids} == {"a", "b"}
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])


def test_a_step_is_the_same_data_on_any_ranks_and_micro_batches(sources):
    a, b = sources
    one = MixedLoader({a: 0.7, b: 0.3}, 8, 8, seed=1).batch_at(2).input_ids
    two = torch.cat([MixedLoader({a: 0.7, b: 0.3}, 8, 4, seed=1, rank=r, world_size=2)
                     .batch_at(2).input_ids for r in (0, 1)])
    micro = torch.cat([MixedLoader({a: 0.7, b: 0.3}, 8, 2, seed=1).batch_at(s).input_ids
                       for s in range(8, 12)])
    assert torch.equal(one, two) and torch.equal(one, micro)


def test_resume_continues_exactly_and_refuses_another_mix(sources):
    a, b = sources
    run = MixedLoader({a: 2, b: 1}, 8, 4, seed=0)
    for _ in range(5):
        next(run)
    state = run.state_dict()
    again = MixedLoader({a: 2, b: 1}, 8, 2, seed=0)  # half the micro-batch: same samples
    again.load_state_dict(state)
    assert torch.equal(next(run).input_ids,
                       torch.cat([next(again).input_ids, next(again).input_ids]))
    with pytest.raises(ValueError, match="saved with mix=.*resume with the same data"):
        MixedLoader({a: 1, b: 1}, 8, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with data.mix, this run has none"):
        BlockLoader(a, 8, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved without data.mix, this run has it"):
        run.load_state_dict(BlockLoader(a, 8, 4, seed=0).state_dict())


def test_sft_and_plain_sources_mix_with_their_own_loss_masks(tmp_path, sources):
    a, _ = sources
    docs = _docs(500, 1000, 2, n=10)
    masks = [[0] * (len(d) // 2) + [1] * (len(d) - len(d) // 2) for d in docs]
    sft = prepared(tmp_path / "sft", docs, masks=masks)
    batch = MixedLoader({a: 1, str(sft): 1}, 16, 32, seed=0).batch_at(0)
    plain = [t for r, t in zip(batch.input_ids, batch.targets) if _source_of(r) == "a"]
    assert plain and all((t != IGNORE_INDEX).all() for t in plain)
    assert any((t == IGNORE_INDEX).any() for r, t in zip(batch.input_ids, batch.targets)
               if _source_of(r) == "b")


def test_boundaries_follow_each_rows_own_source(sources):
    a, b = sources
    batch = MixedLoader({a: 1, b: 1}, 32, 8, seed=0, boundaries=True).batch_at(0)
    for row, pos in zip(batch.input_ids, batch.position_ids):
        # a position restarts right after every EOS (0) inside the row, nowhere else
        after_eos = torch.cat([torch.tensor([False]), row[:-1] == 0])
        restarts = (pos == 0)
        assert torch.equal(restarts[1:], after_eos[1:])


def test_bad_mixes_name_the_problem(tmp_path, sources):
    a, b = sources
    other = prepared(tmp_path / "c", _docs(1, 500, 3), vocab=600)
    with pytest.raises(FormatError, match=r"data.mix: .*c was tokenized otherwise than .*a "
                                          r"\(vocabulary 600 vs 1000.*same --tokenizer"):
        MixedLoader({a: 1, str(other): 1}, 8, 4)
    with pytest.raises(ValueError, match="weights must be positive numbers"):
        MixedLoader({a: 1, b: 0}, 8, 4)
    with pytest.raises(ValueError, match=r"weigh less than 1/4096 of the mix"):
        MixedLoader({a: 1, b: 1e-5}, 8, 4)
    with pytest.raises(ValueError, match="at least one dataset"):
        MixedLoader({}, 8, 4)
