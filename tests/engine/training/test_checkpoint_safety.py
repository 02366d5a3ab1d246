"""A checkpoint folder never runs code: a pickled payload in any file of it is refused by name,
on --resume DIR and --resume auto, before anything unpickles it for real."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.engine_helpers import TINY, run_engine

pytestmark = pytest.mark.slow
FILES = ["trainer-rank00.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
COMMON = [*TINY, "--data", "digits", "--global-batch", "16", "--log-every", "1", "--zero-stage", "2",
          "--no-tensorboard", "--keep-last-k", "0"]


class _Marker:
    """Unpickling calls open(path, "w"): the file appears exactly when code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_engine([*COMMON, "--max-steps", "2", "--ckpt-every", "1", "--results-dir", str(out)])
    return out


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("resume", ["dir", "auto"])
def test_a_planted_payload_is_refused_and_never_runs(trained, tmp_path, name, resume):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = run / "checkpoints" / "step_0000002"
    marker = tmp_path / "CODE_RAN"
    state = torch.load(step / name, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["planted"] = _Marker(str(marker))
    torch.save(state, step / name)
    where = str(step) if resume == "dir" else "auto"
    proc = run_engine([*COMMON, "--max-steps", "3", "--results-dir", str(run), "--resume", where], check=False)
    assert proc.returncode != 0
    assert not marker.exists(), "the payload ran"
    said = proc.stdout + proc.stderr
    assert f"refusing to resume from {step}: {name} does not load as tensors and plain data" in said, said[-3000:]
    assert "Traceback" not in said


def test_an_untouched_folder_resumes(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    proc = run_engine([*COMMON, "--max-steps", "3", "--results-dir", str(run), "--resume", "auto"])
    assert "resumed from" in proc.stdout
