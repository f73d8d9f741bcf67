"""The run's metrics file across a resume."""

import json

from fastlm.train.metrics import MetricsLog


def test_resume_drops_the_rows_past_its_checkpoint_and_a_cut_line(tmp_path):
    """A resume from step 4 runs steps 5.. again: their old rows (and a last line cut short by
    the crash) leave the file, so each step is in it once, as in TensorBoard (purge_step)."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    log = MetricsLog(tmp_path, 0, total=10, start=4, tensorboard=False, progress=False)
    log.log(5, loss=0.5)
    log.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and got[-1]["loss"] == 0.5
    assert got[:4] == rows[:4] and not (tmp_path / "metrics.jsonl.tmp").exists()


def test_other_ranks_leave_the_file_alone_and_a_start_from_scratch_empties_it(tmp_path):
    """A run killed before its first checkpoint starts again from step 0 (--resume auto finds
    none): its rows go too."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9}\n')
    MetricsLog(tmp_path, 1, total=10, start=4, tensorboard=False, progress=False).close()
    assert path.read_text() == '{"step": 9}\n'
    MetricsLog(tmp_path, 0, total=10, start=0, tensorboard=False, progress=False).close()
    assert path.read_text() == ""


def test_wandb_offline_run_is_continued_by_a_resume(tmp_path, monkeypatch):
    """The real library, offline (no network here): the first log creates a W&B run whose id
    the run directory keeps, and the next MetricsLog (a resume) continues that run; other
    ranks start none."""
    import pytest

    wandb = pytest.importorskip("wandb")  # a dev dependency: installed in CI
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    init = {"project": "p", "name": "n", "config": {"train": {"max_steps": 3}}}
    MetricsLog(tmp_path, 1, total=3, start=0, tensorboard=False, progress=False,
               wandb=init).close()
    assert not (tmp_path / "wandb_id").exists()
    log = MetricsLog(tmp_path, 0, total=3, start=0, tensorboard=False, progress=False, wandb=init)
    assert wandb.run is not None and wandb.run.config["train"] == {"max_steps": 3}
    log.log(1, loss=2.0, lr=0.1)
    log.log(2, sample="a <b> sample")
    log.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    log = MetricsLog(tmp_path, 0, total=5, start=2, tensorboard=False, progress=False, wandb=init)
    assert wandb.run.id == run_id
    log.close()
