"""Rank-0 progress and metrics: a tqdm bar, a JSONL file, TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLog:
    """Writes nothing on ranks other than 0."""

    def __init__(self, out_dir: Path, rank: int, *, total: int, start: int, tensorboard: bool,
                 progress: bool, wandb: dict | None = None):
        """``wandb``: the arguments of ``wandb.init`` (project, name, config) to log there too;
        the run's W&B id is kept in ``out_dir``, so a resume continues the same W&B run."""
        self.enabled = rank == 0
        self._file = self._tb = self._bar = self._wandb = None
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
        if wandb is not None:
            self._wandb = _wandb_run(out_dir, wandb)
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
        if self._wandb is not None:
            import html

            import wandb

            # a step W&B already has (a resume re-running steps) is dropped by W&B with a
            # warning: it keeps the values first logged, which an exact resume repeats anyway
            self._wandb.log({k: wandb.Html(f"<pre>{html.escape(v)}</pre>") if isinstance(v, str)
                             else v for k, v in values.items() if v is not None}, step=step)

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
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()


def require_wandb():
    """The wandb module, or an error naming the config key and the fix."""
    try:
        import wandb
    except ImportError as exc:
        from fastlm.train.config import ConfigError

        raise ConfigError("log.wandb is on but wandb is not installed: pip install wandb "
                          "(or 'fastlm[wandb]'), or set log.wandb=false") from exc
    return wandb


def _wandb_run(out_dir: Path, init: dict):
    wandb = require_wandb()
    id_file = out_dir / "wandb_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import uuid

        run_id = uuid.uuid4().hex[:12]  # W&B's id alphabet (lowercase letters, digits)
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    return wandb.init(id=run_id, resume="allow", dir=str(out_dir), **init)


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
