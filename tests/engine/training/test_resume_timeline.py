"""Resuming from an older step: the checkpoint just written and the one resumed from are never
pruned, and the old timeline's newer checkpoints are set aside, said in the log."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.training.checkpoint import CheckpointDir
from tests.engine_helpers import TINY, run_engine

pytestmark = pytest.mark.slow
COMMON = [*TINY, "--data", "digits", "--global-batch", "16", "--log-every", "1", "--zero-stage", "2",
          "--no-tensorboard", "--ckpt-every", "1"]


def test_resume_from_an_older_step_keeps_the_new_timeline(tmp_path):
    run_engine([*COMMON, "--max-steps", "6", "--keep-last-k", "0", "--results-dir", str(tmp_path)])
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    assert ckpts.steps() == [1, 2, 3, 4, 5, 6]
    proc = run_engine([*COMMON, "--max-steps", "3", "--keep-last-k", "1", "--results-dir", str(tmp_path),
                       "--resume", str(ckpts.path(2))])
    assert "resuming from step 2 abandons the newer checkpoints of that run (steps 3, 4, 5, 6)" in proc.stdout
    # the new step 3 and the step resumed from stay; keep-last-k 1 pruned nothing it must keep
    assert ckpts.steps() == [2, 3]
    assert ckpts.release_path(3).exists() and ckpts.release_path(2).exists()
    aside = tmp_path / "checkpoints" / "abandoned-after-0000002"
    assert sorted(p.name for p in aside.iterdir() if p.is_dir()) == [f"step_000000{s}" for s in (3, 4, 5, 6)]
    assert (aside / "0000006.pt").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and summary["checkpoint"].endswith("step_0000003")
    assert all(Path(summary[k]).exists() for k in ("checkpoint", "release_checkpoint"))
    # auto now continues the new timeline, never the abandoned step 6
    proc = run_engine([*COMMON, "--max-steps", "4", "--keep-last-k", "1", "--results-dir", str(tmp_path),
                       "--resume", "auto"])
    assert "at step 3" in proc.stdout and "abandons" not in proc.stdout
