"""The metrics sinks of a real run: TensorBoard events and an offline wandb run next to
metrics.jsonl, rank 0 only; --no-tensorboard; --wandb without wandb is a usage error."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.train import parse
from engine.training.metrics import MetricSinks, wandb_mode
from engine.training.plots import DPI, RUN_SIZE, run_floor
from tests.engine_helpers import REPO, TINY, engine_env, metrics, run_engine

ARGS = [*TINY, "--data", "digits", "--global-batch", "8", "--log-every", "1", "--ckpt-every", "100"]
RUN_PNG = (int(RUN_SIZE[0] * DPI), int(RUN_SIZE[1] * DPI))


def _offline_env(tmp_path) -> dict[str, str]:
    """No wandb login and no chosen mode, whatever the machine running the tests has."""
    env = engine_env(NETRC=str(tmp_path / "no-netrc"))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def sink_run(tmp_path_factory):
    """3 steps on 2 CPU ranks with TensorBoard (the default) and --wandb, no login."""
    out = tmp_path_factory.mktemp("sinks")
    run_engine([*ARGS, "--max-steps", "3", "--wandb", "sinks-test", "--results-dir", str(out)],
               env=_offline_env(out))
    return out


@pytest.mark.slow
def test_tensorboard_events_hold_every_metric_and_the_grid(sink_run):
    events = list((sink_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # rank 0 only
    acc = EventAccumulator(str(sink_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("diffusion_loss", "dispersive/block_1", "dispersive_total", "grad_norm", "lr", "images_per_s",
                "tflops", "skipped_steps", "time/data", "time/forward", "time/backward", "time/optimizer",
                "time/ema"):
        assert tag in tags, tag
    records = metrics(sink_run)
    numeric = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert numeric <= tags  # every number of the record; MFU is None on CPUs and left out
    for tag in ("diffusion_loss", "dispersive/block_1", "grad_norm"):
        logged = {e.step: e.value for e in acc.Scalars(tag)}
        assert logged == {r["step"]: pytest.approx(r[tag], rel=1e-6) for r in records}, tag
    assert "samples/ema" in acc.Tags()["images"]
    image = acc.Images("samples/ema")[-1]
    assert image.step == 3 and image.width > 0 and image.height > 0


@pytest.mark.slow
def test_wandb_runs_offline_without_a_login(sink_run):
    runs = list((sink_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # offline, and rank 0 only
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"diffusion_loss", b"dispersive/block_1", b"grad_norm", b"time/forward"):
        assert key in data, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))  # the sample grid


@pytest.mark.slow
def test_run_ends_with_curves_and_the_plot_command_redraws_them(sink_run, tmp_path):
    with Image.open(sink_run / "curves.png") as img:
        assert img.format == "PNG" and img.size == RUN_PNG
    # The floor line comes from the configs the run wrote: local batch 8 / 2 ranks = 4.
    assert run_floor(sink_run).value == pytest.approx(-math.log(4))
    out = tmp_path / "again.png"
    proc = subprocess.run([sys.executable, "-m", "engine.plot", str(sink_run), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        img.verify()
        assert img.size == RUN_PNG


@pytest.mark.slow
def test_no_tensorboard_writes_no_events(tmp_path):
    run_engine([*ARGS, "--max-steps", "2", "--no-tensorboard", "--results-dir", str(tmp_path)], ranks=0)
    assert not (tmp_path / "tensorboard").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]  # the files sink is always on


def test_wandb_not_installed_is_a_usage_error_before_launch(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        parse(["--wandb", "my-project"])
    assert e.value.code == 2
    assert "error: --wandb needs the wandb package" in capsys.readouterr().err
    with pytest.raises(ImportError, match="--wandb needs the wandb package"):
        MetricSinks.open(tmp_path, enabled=True, tensorboard=False, wandb="my-project")


def test_wandb_mode_is_offline_unless_chosen_or_logged_in(tmp_path):
    missing = {"NETRC": str(tmp_path / "none")}
    assert wandb_mode(missing) == "offline"
    assert wandb_mode({**missing, "WANDB_MODE": "online"}) is None  # the user's choice stands
    assert wandb_mode({**missing, "WANDB_API_KEY": "x" * 40}) is None
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode({"NETRC": str(netrc)}) is None  # wandb login wrote the key
    assert wandb_mode({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_a_resumed_run_hides_what_the_crashed_session_logged_after_its_checkpoint(tmp_path):
    from engine.training.metrics import MetricSinks

    first = MetricSinks.open(tmp_path, enabled=True)
    for step in range(1, 7):  # logged up to 6, checkpoint at 4, then killed
        first.scalars(step, {"diffusion_loss": 1.0})
    first.close()
    resumed = MetricSinks.open(tmp_path, enabled=True, resumed_at=4)
    for step in (5, 6, 7):
        resumed.scalars(step, {"diffusion_loss": 2.0})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("diffusion_loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6, 7]  # each step once (it was 1..6, 5..7)
    assert [e.value for e in events] == [1.0] * 4 + [2.0] * 3
