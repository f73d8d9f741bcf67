"""Rank-0 progress and metrics: a tqdm bar, a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLog:
    """Writes nothing on ranks other than 0."""

    def __init__(self, out_dir: Path, rank: int, *, total: int, start: int, tensorboard: bool,
                 progress: bool):
        self.enabled = rank == 0
        self._file = self._tb = self._bar = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        _purge(out_dir / "metrics.jsonl", start)
        self._file = open(out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
            except ImportError:
                import logging

                logging.getLogger("fastlm").warning(
                    "log.tensorboard is on but tensorboard is not installed "
                    "(pip install tensorboard); logging to metrics.jsonl only")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="step",
                             dynamic_ncols=True)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in values.items() if v is not None})
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, str):  # samples: TensorBoard's text tab
                    self._tb.add_text(k, v, step)

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: v for k, v in postfix.items() if v is not None},
                                  refresh=True)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _purge(path: Path, step: int) -> None:
    """A run drops the rows logged after the step it starts from (the steps it runs again), as
    TensorBoard's purge_step does for its events: a resume after a crash, or from an earlier
    checkpoint, had left each re-run step in the file twice (a run killed before its first
    checkpoint starts again from step 0). A line cut short by the crash goes
    too. Rewritten to a temporary file, then renamed: a crash here leaves the old file whole."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
