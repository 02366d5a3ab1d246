"""What a resume may change (applied) and may not (refused by name, before launch), and the
checkpoint folders a resume refuses: a save's files missing, a damaged file, another world size."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.training.checkpoint import COMPLETE, NONFINITE, CheckpointDir
from tests.engine_helpers import TINY, metrics, run_engine

COMMON = [*TINY, "--data", "digits", "--global-batch", "16", "--log-every", "1", "--zero-stage", "2",
          "--no-tensorboard", "--keep-last-k", "0", "--ckpt-every", "2"]


def _refused(proc, *needles: str) -> str:
    """The run failed before launch: exit 2, one error line per rank (2), no traceback."""
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert said.count("train.py: error:") == 2, said[-3000:]  # the two ranks' lines may interleave
    for needle in needles:
        assert needle in said, said[-3000:]
    return said


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_engine([*COMMON, "--max-steps", "2", "--results-dir", str(out)])
    return out


def _copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


@pytest.mark.slow
def test_a_new_lr_is_applied_on_resume(trained, tmp_path):
    run = _copy(trained, tmp_path)
    proc = run_engine([*COMMON, "--max-steps", "4", "--results-dir", str(run), "--resume", "auto", "--lr", "1e-2"])
    assert "resume applies the new settings: optim.lr 0.0001 -> 0.01" in proc.stdout
    lrs = {r["step"]: r["lr"] for r in metrics(run)}
    assert lrs[1] == pytest.approx(1e-4) and lrs[3] == pytest.approx(1e-2) and lrs[4] == pytest.approx(1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("flags, named", [
    (["--model", "dit_s"], "model.name: saved 'sit_s', now 'dit_s'"),
    (["--objective", "meanflow"], "objective: saved 'auto', now 'meanflow'"),
    (["--disp-tau", "0.5"], "dispersive.tau: saved 1.0, now 0.5"),
    (["--precision", "bf16"], "precision: saved 'fp32', now 'bf16'"),
])
def test_a_fixed_setting_changed_on_resume_is_refused(trained, tmp_path, flags, named):
    run = _copy(trained, tmp_path)
    proc = run_engine([*COMMON, "--max-steps", "4", "--results-dir", str(run), "--resume", "auto", *flags],
                      check=False)
    _refused(proc, "these settings are fixed for a run", named)


@pytest.mark.slow
def test_a_folder_with_only_complete_is_refused(trained, tmp_path):
    run = _copy(trained, tmp_path)
    step = run / "checkpoints" / "step_0000002"
    for f in step.iterdir():
        if f.name != COMPLETE:
            f.unlink()
    proc = run_engine([*COMMON, "--max-steps", "4", "--results-dir", str(run), "--resume", str(step)], check=False)
    _refused(proc, f"cannot resume from {step}: it is not a whole checkpoint", "trainer-rank00.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trainer-rank01.pt", "mp_rank_00_model_states.pt"])
def test_a_truncated_file_is_named(trained, tmp_path, name):
    run = _copy(trained, tmp_path)
    step = run / "checkpoints" / "step_0000002"
    data = (step / name).read_bytes()
    (step / name).write_bytes(data[: len(data) // 2])
    proc = run_engine([*COMMON, "--max-steps", "4", "--results-dir", str(run), "--resume", "auto"], check=False)
    _refused(proc, f"cannot resume from {step}: {name} is damaged")


@pytest.mark.slow
def test_another_world_size_is_refused_before_launch(trained, tmp_path):
    run = _copy(trained, tmp_path)
    proc = run_engine([*COMMON, "--max-steps", "4", "--results-dir", str(run), "--resume", "auto"], ranks=0,
                      check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in said
    assert "saved by 2 rank(s) and this launch has 1; resume with 2 rank(s)" in said


def test_what_resume_may_change_without_a_launch():
    from engine.config.flags import config_to_dict
    from engine.training.checkpoint import CheckpointError
    from engine.training.config import TrainConfig
    from engine.training.resume import check_resume

    saved = config_to_dict(TrainConfig())
    now = config_to_dict(TrainConfig())
    now["dispersive"]["backend"], now["meanflow"]["sample_steps"], now["optim"]["lr"] = "torch", 2, 3e-4
    now["model"]["name"] = "SiT-XL/2"  # the release's spelling of the same model
    assert check_resume(saved, now, Path("ckpt")) == ["optim.lr 0.0001 -> 0.0003"]
    del saved["dispersive"]["scale_invariant"]  # saved before the setting existed: not compared
    now["dispersive"]["scale_invariant"] = True
    assert check_resume(saved, now, Path("ckpt")) == ["optim.lr 0.0001 -> 0.0003"]
    now["dispersive"]["blocks"] = "all"
    with pytest.raises(CheckpointError, match=r"dispersive.blocks: saved 'last', now 'all'"):
        check_resume(saved, now, Path("ckpt"))


def test_a_save_inside_a_nonfinite_streak_never_prunes_the_last_good_one(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    for step in (2, 3, 4):
        ckpts.path(step).mkdir(parents=True)
        if step > 2:
            (ckpts.path(step) / NONFINITE).write_text("streak\n")
        ckpts.mark_complete(step)
    assert ckpts.prune(keep_last_k=1, protect=(4,)) == [3]
    assert ckpts.steps() == [2, 4]
    ckpts.path(5).mkdir()
    ckpts.mark_complete(5)  # healthy again: the good one is now the newest
    assert ckpts.prune(keep_last_k=1, protect=(5,)) == [2, 4]


def test_a_failed_write_removes_an_incomplete_folder_but_never_a_complete_one(tmp_path):
    import errno

    from engine.training.checkpoint import CheckpointError, CheckpointManager

    manager = CheckpointManager(tmp_path, rank=0, keep_last_k=1, engine=None, ema=None, loader=None,
                                full_weights=lambda keep: None, release_fields=dict)

    def denied():
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    done = manager.dir.path(3)
    done.mkdir(parents=True)
    manager.dir.mark_complete(3)  # e.g. the prune after COMPLETE failed
    with pytest.raises(CheckpointError, match="the checkpoint of step 3 was saved, but then PermissionError"):
        manager._agree(3, done, denied)
    assert (done / COMPLETE).exists()
    partial = manager.dir.path(4)
    partial.mkdir()
    with pytest.raises(CheckpointError, match="the checkpoint of step 4 was not saved: PermissionError"):
        manager._agree(4, partial, denied)
    assert not partial.exists()
