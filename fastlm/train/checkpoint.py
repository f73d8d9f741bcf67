"""Checkpoints that a crash can never leave half-visible.

Layout under ``<out_dir>/checkpoints``::

    step00000500/         DeepSpeed engine state (model, optimizer, scheduler; ZeRO shards)
        fastlm_state.json run config, step, loader position, metrics so far
        rng_rank<r>.pt    each rank's RNG states
        COMPLETE          written last, after every rank finished
    latest                the tag of the newest COMPLETE checkpoint (replaced atomically)
    best                  the tag kept as best (by validation loss), if any
    universal/<tag>/      only while a resume on another number of ranks loads (see load)

``latest`` is updated by write-to-temp + rename only after ``COMPLETE`` exists, so a crash
mid-save leaves it naming the previous checkpoint; an incomplete directory is ignored on
resume and removed by the next save's pruning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastlm.train import dist as fdist

COMPLETE = "COMPLETE"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, *,
         keep_last: int, best_tag: str | None = None) -> str:
    """Save on every rank (collective); returns the tag. ``state`` is JSON-serialisable."""
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    _crash_point("FASTLM_TEST_CRASH_IN_SAVE", step)
    fdist.barrier()
    if rank == 0:
        _atomic_write(ckpt_dir / tag / "fastlm_state.json", json.dumps(state, indent=1))
        _atomic_write(ckpt_dir / tag / COMPLETE, "")
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last, best_tag)
    fdist.barrier()
    return tag


def mark_best(ckpt_dir: Path, tag: str) -> None:
    _atomic_write(ckpt_dir / "best", tag)


def prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and the best; drop the rest and any
    incomplete leftovers of crashed saves."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if (ckpt_dir / t / COMPLETE).exists()]
    keep = set(complete[-keep_last:])
    if best_tag:
        keep.add(best_tag)
    for t in tags:
        if t not in keep:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (ckpt_dir / tag / COMPLETE).exists():
        raise RuntimeError(f"{f} names {tag}, which is not a complete checkpoint")
    return tag


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) for a run directory, a checkpoints directory, a tag directory, or
    the ``latest`` / ``best`` file of a checkpoints directory (the checkpoint it names)."""
    p = Path(path)
    if p.is_file() and p.name in ("latest", "best"):
        tag = p.read_text().strip()
        if not (p.parent / tag / COMPLETE).exists():
            raise RuntimeError(f"{p} names {tag}, which is not a complete checkpoint")
        return p.parent, tag
    for ckpt_dir in (p / "checkpoints", p):
        if (ckpt_dir / "latest").is_file():
            return ckpt_dir, latest_tag(ckpt_dir)
    if (p / COMPLETE).exists():
        return p.parent, p.name
    raise FileNotFoundError(
        f"{path}: no checkpoint found (expected a run directory with checkpoints/latest, a "
        f"checkpoints directory, a checkpoint directory holding {COMPLETE}, or "
        f"checkpoints/best)")


def damaged_file(ckpt_dir: Path, tag: str) -> str | None:
    """What is wrong with the first damaged file of a checkpoint, or None.

    A checkpoint marked COMPLETE can still be damaged afterwards: copied from another machine
    in part, cut short by a full disk on a filesystem that reported success, deleted from.
    torch.load then failed on one rank with "failed finding central directory" and no file
    named, while the others died in a collective. torch's files are zip archives whose index
    sits at the end, so a cut file has none: checked here by reading each index (cheap, no
    tensor data read), with the fastlm state file's JSON. Damage inside the data is left to
    torch.load (it reads every byte anyway).
    """
    d = ckpt_dir / tag
    try:
        state = json.loads((d / "fastlm_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"fastlm_state.json cannot be read ({exc})"
    if not any(d.glob("*model_states.pt")):
        return "its model state file (*model_states.pt) is missing"
    # ZeRO's optimizer state: one file for each rank that saved it, or none (ZeRO 0 in fp32)
    ranks = {int(m.group(1)) for p in d.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", p.name))}
    world = state.get("loader", {}).get("world_size")
    if ranks and isinstance(world, int) and ranks != set(range(world)):
        missing = sorted(set(range(world)) - ranks)
        return (f"it was saved by {world} ranks, and the optimizer state of rank(s) "
                f"{missing or sorted(ranks - set(range(world)))} is "
                f"{'missing' if missing else 'extra'} (*zero_pp_rank_N_*optim_states.pt)")
    for path in sorted(d.glob("*.pt")):
        try:
            with open(path, "rb") as f:
                head = f.read(4)
            if head[:2] == b"PK":  # a zip archive (what torch.save writes)
                with zipfile.ZipFile(path) as z:
                    z.infolist()
            elif not head:
                return f"{path.name} is empty"
            # else torch's legacy (pickle) format: nothing to check cheaply
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{path.name} is not a whole torch file ({exc})"
    return None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the COMPLETE checkpoints in ``ckpt_dir``, oldest first."""
    return sorted(p.name for p in ckpt_dir.glob("step*") if (p / COMPLETE).exists())


def saved_state(ckpt_dir: Path, tag: str) -> dict:
    """The fastlm state a checkpoint was saved with (step, loader position, run config...)."""
    return json.loads((ckpt_dir / tag / "fastlm_state.json").read_text())


def saved_world_size(ckpt_dir: Path, tag: str) -> int | None:
    """How many data-parallel ranks the optimizer state is partitioned over (one ZeRO file
    each), or None when it is not partitioned (ZeRO 0 without bf16: any world loads it)."""
    return len(list((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt"))) or None


def load(engine, ckpt_dir: Path, tag: str, rank: int, world: int = 1) -> None:
    """Restore engine state and this rank's RNG (the fastlm state: :func:`saved_state`).

    ZeRO partitions the optimizer state over the ranks that saved it, and DeepSpeed loads it
    only into as many. On another number of ranks (a node lost, or more of them), the
    checkpoint is converted once to DeepSpeed's universal format (one file per parameter and
    state, no partitioning), which every rank reads its new partition from."""
    saved = saved_world_size(ckpt_dir, tag)
    if saved is None or saved == world:
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
    else:
        _load_universal(engine, ckpt_dir, tag, rank, saved, world)
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))


UNIVERSAL = "universal"  # converted checkpoints, under the checkpoints directory


def _load_universal(engine, ckpt_dir: Path, tag: str, rank: int, saved: int, world: int) -> None:
    import logging

    out = ckpt_dir / UNIVERSAL / tag
    if rank == 0:
        logging.getLogger("fastlm").warning(
            "%s was saved by %d ranks, this run has %d: converting it to DeepSpeed's universal "
            "checkpoint in %s (once) and loading each rank's new partition from it",
            ckpt_dir / tag, saved, world, out)
        if not (out / COMPLETE).exists():
            _to_universal(ckpt_dir / tag, out)
    fdist.barrier()
    config = engine._config  # DeepSpeed reads the universal switch from its config at load
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    # ZeRO-3's universal load gives every param group the first group's settings: the group
    # without weight decay (norms, biases, embeddings) got the decay. The learning rate is the
    # checkpoint's (the same in every group); the rest is this run's config.
    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    try:
        engine.load_checkpoint(str(ckpt_dir / UNIVERSAL), tag=tag)
    finally:
        config.load_universal_checkpoint = before
    for group, kept in zip(groups, settings):
        group.update(kept)
    # ... and one step counter tensor to every sub-group's state: each sub-group's step then
    # advanced it, so the second group's bias correction ran a step ahead
    state = getattr(engine.optimizer, "optimizer", engine.optimizer).state
    for st in state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()
    fdist.barrier()
    if rank == 0:  # the next save is partitioned for this world again
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)


def _to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter (ds_to_universal) into a temporary directory, renamed when done."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        # fastlm's saves predate the marker the converter looks for; a plain data-parallel
        # model needs nothing in it but its version
        inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, rank 0 only
        ds_to_universal.main(args)
    (tmp / COMPLETE).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _crash_point(var: str, step: int) -> None:
    """Fault injection for the crash-safety tests: die at this point at the named step."""
    if os.environ.get(var) == str(step):
        os._exit(17)
