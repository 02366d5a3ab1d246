"""The toy reproduction harness (engine.toy): pieces, and one --smoke run end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.experiments.classifier import DigitClassifier, random_shift
from engine.experiments.report import short_label, spread, study_summary, versus
from engine.experiments.scoring import sample_noise_and_labels, term_gap
from engine.experiments.settings import DispSetting, ToyConfig
from engine.toy import main


def test_disp_setting_flags_and_validation():
    s = DispSetting(lambda_=0.5, tau=0.5, blocks="0,2", variant="hinge")
    assert s.tag() == "disp_l0.5_t0.5_0-2_hinge"
    assert s.flags() == ["--disp-preset", "release", "--disp-lambda", "0.5", "--disp-tau", "0.5",
                         "--disp-blocks", "0,2", "--disp-variant", "hinge"]
    assert DispSetting(blocks=[1, 3]).blocks == "1,3"
    grid = DispSetting.product([0.25, 0.5], [1.0], ["last", "all"], ["infonce_l2"])
    assert [(g.lambda_, g.blocks) for g in grid] == [(0.25, "last"), (0.25, "all"), (0.5, "last"), (0.5, "all")]
    with pytest.raises(ValueError, match="variant must be one of"):
        DispSetting(variant="nope")
    with pytest.raises(ValueError, match="lambda_ must be > 0"):
        DispSetting(lambda_=0.0)
    with pytest.raises(ValueError, match="tau"):
        DispSetting(tau=0.0)
    with pytest.raises(ValueError, match="comma-separated ints"):
        DispSetting(blocks="first")


def test_toy_config_and_training_flags():
    cfg = ToyConfig()
    flags = cfg.train_flags()
    # Same seed in every run (identical init, batches and noise); digits are never mirrored.
    assert flags[flags.index("--seed") + 1] == "0" and "--no-flip" in flags
    assert flags[flags.index("--max-steps") + 1] == "2000"
    assert ToyConfig.smoke().steps < 10
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ToyConfig(steps=0)


def test_classifier_and_fixed_noise():
    net = DigitClassifier()
    x = torch.randn(5, 1, 16, 16)
    assert net(x).shape == (5, 10) and net.features(x).shape == (5, DigitClassifier.FEATURES)
    shifted = random_shift(torch.zeros(2, 1, 16, 16), torch.Generator().manual_seed(3))
    assert shifted.shape == (2, 1, 16, 16)
    cfg = ToyConfig.smoke()
    n1, y1 = sample_noise_and_labels(cfg)
    n2, y2 = sample_noise_and_labels(cfg)
    assert torch.equal(n1, n2) and torch.equal(y1, y2)  # every run samples from the same noise
    assert y1.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_smoke_end_to_end_then_sweep_reuses_runs(tmp_path, capsys):
    out = tmp_path / "toy"
    result = main(["--out", str(out), "--smoke"])
    for name in ("results.md", "results.json", "samples.png", "curves.png", "classifier.pt"):
        assert (out / name).is_file(), name
    runs = result["runs"]
    assert [r["name"] for r in runs] == ["baseline", "disp_l0.25_t1_last_infonce_l2"]
    for r in runs:
        assert r["fd"] >= 0 and 0 <= r["class_acc"] <= 1 and 0 <= r["probe_ema_best"] <= 1
        assert r["infonce_l2"] >= r["infonce_floor"] - 1e-9
    table = (out / "results.md").read_text()
    assert "| no Dispersive Loss |" in table and "| lambda 0.25, tau 1, blocks last, infonce_l2 |" in table
    # Both runs were trained with identical settings apart from the regulariser.
    cfgs = [json.loads((p / "config.json").read_text()) for p in sorted((out / "runs").iterdir())]
    assert len(cfgs) == 2
    assert cfgs[0]["dispersive"]["lambda_"] != cfgs[1]["dispersive"]["lambda_"]
    assert {k: v for k, v in cfgs[0].items() if k not in ("dispersive", "results_dir")} == \
           {k: v for k, v in cfgs[1].items() if k not in ("dispersive", "results_dir")}
    # The samples were written in ADM's layout too.
    with np.load(next((out / "runs").iterdir()) / "samples_ema.npz") as z:
        assert z["arr_0"].shape == (40, 16, 16, 3) and z["arr_0"].dtype == np.uint8

    # A sweep over the same setting shares the baseline, the run and the classifier: nothing is
    # trained or scored again.
    capsys.readouterr()
    sweep = main(["sweep", "--out", str(out), "--smoke", "--lambdas", "0.25", "--taus", "1", "--blocks", "last",
                  "--variants", "infonce_l2"])
    log = capsys.readouterr().out
    assert "training" not in log and "sampling" not in log and log.count("reusing") == 2
    assert (out / "sweep_s4_d2_h32_p4.md").is_file()
    with Image.open(out / "sweep_s4_d2_h32_p4_curves.png") as img:  # every run's curves in one picture
        assert img.format == "PNG" and img.size == (1200, 450)
    assert [r["fd"] for r in sweep["runs"]] == pytest.approx([r["fd"] for r in runs])


def test_scale_invariant_setting_and_the_study_list():
    s = DispSetting(tau=0.5, scale_invariant=True)
    assert s.tag() == "disp_l0.25_t0.5_last_infonce_l2_si" and s.describe().endswith(", scale-invariant")
    assert s.flags()[-1] == "--disp-scale-invariant" and "--disp-scale-invariant" not in DispSetting().flags()
    with pytest.raises(ValueError, match="scale_invariant"):
        DispSetting(variant="infonce_cosine", scale_invariant=True)  # cosine is scale-invariant already
    grid = DispSetting.product([0.25], [1.0], ["last"], ["infonce_l2"], [False, True])
    assert [g.scale_invariant for g in grid] == [False, True]
    study = DispSetting.study()
    assert len(study) == 9 and len({d.tag() for d in study}) == 9  # every setting its own runs
    assert study[0] == DispSetting() and study[1] == DispSetting(lambda_=0.5, tau=0.5, blocks="paper")
    assert sorted((d.blocks, d.tau) for d in study if d.scale_invariant) == \
           sorted((b, t) for b in ("last", "all") for t in (0.25, 0.5, 1.0))
    assert study[-1].variant == "infonce_cosine"
    flags = ToyConfig().train_flags(seed=7)
    assert flags[flags.index("--seed") + 1] == "7"
    with pytest.raises(SystemExit):  # --study names its own settings
        main(["sweep", "--study", "--taus", "0.5", "--smoke"])


def test_spread_and_term_gap():
    m = spread([1.0, 2.0, None, float("nan"), 6.0])
    assert m["n"] == 3 and m["mean"] == pytest.approx(3.0) and m["std"] == pytest.approx(np.std([1, 2, 6], ddof=1))
    assert (m["min"], m["max"]) == (1.0, 6.0) and m["values"] == [1.0, 2.0, None, None, 6.0]
    assert spread([4.0])["std"] is None and spread([None])["mean"] is None
    final = {"dispersive/block_0/gap": 0.5, "dispersive/block_3/gap": 1.5, "dispersive/block_3": -2.0}
    assert term_gap(final) == pytest.approx(1.0) and term_gap({"diffusion_loss": 0.3}) is None


def test_versus_the_baseline_needs_every_seed_beyond_the_baseline_range():
    base = spread([6.0, 6.5, 7.0])
    assert versus(spread([5.0, 5.5, 5.9]), base, lower_is_better=True) == "better"
    assert versus(spread([5.0, 5.5, 6.1]), base, lower_is_better=True) == "within the spread"  # 6.1 > 6.0
    assert versus(spread([7.1, 9.0, 8.0]), base, lower_is_better=True) == "worse"
    assert versus(spread([7.1, 9.0, 8.0]), base, lower_is_better=False) == "better"  # e.g. accuracy
    assert versus(spread([5.0]), base, lower_is_better=True) == "n/a"  # one seed says nothing of the spread
    assert versus(spread([5.0, 5.1]), spread([6.0]), lower_is_better=True) == "n/a"
    rows = [{"name": n, "setting": n, "seed": k, "fd": fd, "class_acc": acc, "probe_ema_best": 0.5,
             "diffusion_loss": 0.2, "term_gap": None}
            for n, fds, accs in (("baseline", (6.0, 7.0), (0.90, 0.88)), ("a", (5.0, 5.5), (0.80, 0.95)))
            for k, (fd, acc) in enumerate(zip(fds, accs))]
    summary = study_summary(rows)
    assert summary[0]["versus"] is None
    ticks = [short_label(d.describe()) for d in DispSetting.study()]  # study.png's axis: short and distinct
    assert len(set(ticks)) == len(ticks) and max(map(len, ticks)) <= 24
    assert ticks[2] == "λ0.25, τ0.25, last, SI" and short_label("no Dispersive Loss") == "baseline"
    assert summary[1]["versus"] == {"fd": "better", "class_acc": "within the spread"}


def test_smoke_study_two_seeds_cached_then_one_seed_sweep(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    argv = ["sweep", "--out", str(out), "--smoke", "--taus", "1", "--scale-invariant", "no", "yes", "--seeds", "2"]
    # A study cut in its third run has already written the results of the first two.
    import engine.experiments.toy as toy
    calls, train_run = [], toy.train_run

    def cut_in_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_run(*args, **kwargs)

    monkeypatch.setattr(toy, "train_run", cut_in_third)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    partial = json.loads((out / "results.json").read_text())
    assert (partial["finished"], partial["jobs"], len(partial["runs"])) == (2, 6, 2)
    assert "(2 of 6 runs finished)" in (out / "results.md").read_text() and (out / "study.png").is_file()
    assert [g["seeds"] for g in partial["summary"]] == [[0], [0]]
    # The relaunch's first trained run stands in for a resumed one: a launch that trained only the
    # last steps of a run must not shorten the estimate, so the next line has none.
    trained: list[str] = []

    def first_as_resumed(*args, **kwargs):
        run = train_run(*args, **kwargs)
        if run.reused:
            return run
        trained.append(run.name)
        return dataclasses.replace(run, resumed=True) if len(trained) == 1 else run

    monkeypatch.setattr(toy, "train_run", first_as_resumed)
    capsys.readouterr()
    result = main(argv)
    log = capsys.readouterr().out
    assert "study run 1 of 6: no Dispersive Loss, seed 0" in log and "study run 6 of 6" in log
    assert log.count("reusing") == 2 and "runs finished" not in (out / "results.md").read_text()
    lines = {line.split(":")[0]: line for line in log.splitlines() if "study run" in line}
    assert "left" not in lines["[toy] study run 4 of 6"]  # only a resumed launch so far
    assert "left" in lines["[toy] study run 5 of 6"]  # a time estimate once a run has trained from step 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["finished"] == saved["jobs"] == 6
    assert saved["seeds"] == [0, 1] and [r["seed"] for r in saved["runs"]] == [0, 0, 0, 1, 1, 1]
    assert [g["name"] for g in saved["summary"]] == ["baseline", "disp_l0.25_t1_last_infonce_l2",
                                                     "disp_l0.25_t1_last_infonce_l2_si"]
    for g in saved["summary"]:
        assert g["seeds"] == [0, 1]
        for key in ("fd", "class_acc", "probe_ema_best", "diffusion_loss"):
            m = g["metrics"][key]
            assert len(m["values"]) == 2 and m["values"] == [r[key] for r in saved["runs"] if r["name"] == g["name"]]
            assert m["mean"] == pytest.approx(np.mean(m["values"]))
            assert m["std"] == pytest.approx(np.std(m["values"], ddof=1))
            assert (m["min"], m["max"]) == (min(m["values"]), max(m["values"]))
        gap = g["metrics"]["term_gap"]  # no term, no gap for the baseline
        assert gap["n"] == (0 if g["name"] == "baseline" else 2)
    # Seed 1 trained its own runs (another --seed), the scale-invariant ones with the flag.
    for r in saved["runs"]:
        cfg = json.loads((Path(r["path"]) / "config.json").read_text())
        assert cfg["seed"] == r["seed"] and cfg["dispersive"]["scale_invariant"] == r["name"].endswith("_si")
    fds = {(r["name"], r["seed"]): r["fd"] for r in saved["runs"]}
    assert fds[("baseline", 0)] != fds[("baseline", 1)]
    table = (out / "results.md").read_text()
    assert "| setting | n seeds | FD mean ± std |" in table and "| no Dispersive Loss | 2 |" in table
    assert "| lambda 0.25, tau 1, blocks last, infonce_l2, scale-invariant | 2 |" in table
    assert (out / "study.png").stat().st_size > 20_000
    with Image.open(out / "study.png") as img:
        assert img.format == "PNG" and img.size == (1200, 500)
    assert result["summary"] == saved["summary"]

    # Again: every (setting, seed) is reused, nothing trained or scored.
    ckpts = sorted(out.glob("runs/*/checkpoints/*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    again = main(argv)
    log = capsys.readouterr().out
    assert "[toy] training" not in log and "[toy] sampling" not in log and log.count("reusing") == 6
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes and len(ckpts) == 6
    assert again["summary"] == saved["summary"]

    # One seed: the sweep's output as before, from the study's seed-0 runs.
    sweep = main(argv[:-1] + ["1"])
    log = capsys.readouterr().out
    assert "[toy] training" not in log and log.count("reusing") == 3 and "study run" not in log
    assert (out / "sweep_s4_d2_h32_p4.md").is_file() and "summary" not in sweep
    assert [r["fd"] for r in sweep["runs"]] == pytest.approx([fds[(g["name"], 0)] for g in saved["summary"]])


def test_term_state_says_whether_the_term_acts():
    from engine.experiments.toy import term_state

    acting = term_state({"dispersive/block_5/gap": 0.0077, "dispersive/block_5/off_diagonal": 0.96})
    assert acting == ["block 5: gap 0.0077 to its floor, off-diagonal softmax weight 0.96: acting"]
    (floor,) = term_state({"dispersive/block_0/gap": 2e-4})
    assert floor.startswith("block 0: gap 0.0002 to its floor: at its floor (gap <= 0.001)")
    assert term_state({"diffusion_loss": 0.2}) == []


@pytest.mark.slow
def test_score_command_on_a_finished_train_run(tmp_path):
    """What ./dev.sh demo ends with: class accuracy and FD of a train.py run's EMA samples."""
    import subprocess
    import sys

    from tests.engine_helpers import REPO, TINY, engine_env, run_engine

    run = tmp_path / "run"
    run_engine([*TINY, "--data", "digits", "--no-flip", "--patch-size", "4", "--global-batch", "16",
                "--max-steps", "2", "--log-every", "1", "--no-tensorboard", "--disp-preset", "release",
                "--disp-scale-invariant", "--results-dir", str(run)], ranks=0)
    proc = subprocess.run([sys.executable, "-m", "engine.toy", "score", str(run), "--samples-per-class", "3",
                           "--cache", str(tmp_path / "cache")], cwd=REPO, env=engine_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    score = json.loads((run / "digits_score.json").read_text())
    assert score["samples"] == 30 and 0.0 <= score["class_acc"] <= 1.0 and score["fd"] > 0
    assert (run / "digits_score.png").stat().st_size > 1000
    assert f"class accuracy {score['class_acc']:.3f}, FD {score['fd']:.2f}" in proc.stdout
    assert "dispersive term, block 1: gap" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "engine.toy", "score", str(tmp_path / "nothing")], cwd=REPO,
                             env=engine_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no summary.json" in missing.stderr and "Traceback" not in missing.stderr


def test_score_names_a_run_trained_without_checkpoints(tmp_path):
    from engine.experiments.toy import score_run_dir

    (tmp_path / "summary.json").write_text(json.dumps({"step": 2, "release_checkpoint": None}))
    with pytest.raises(FileNotFoundError, match="trained with --ckpt-every 0, so there is no checkpoint"):
        score_run_dir(tmp_path, ToyConfig.smoke(), tmp_path / "cache")


def test_a_cut_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A run killed mid-way (here: in its save of step 6) is resumed from step 4 by the next call with
    the same command line, and ends bit-identical to a run that was never cut."""
    from engine.experiments import runs

    monkeypatch.setattr(runs, "SAVE_EVERY", 2)
    cfg = ToyConfig.smoke(steps=8)
    straight = runs.train_run(tmp_path / "straight", cfg, None)
    monkeypatch.setenv("DISPERSIVE_FAULT_KILL_IN_SAVE", "6")
    with pytest.raises(RuntimeError, match="failed"):
        runs.train_run(tmp_path / "cut", cfg, None)
    assert not (tmp_path / "cut" / "runs" / straight.path.name / "toy_run.json").exists()
    monkeypatch.delenv("DISPERSIVE_FAULT_KILL_IN_SAVE")
    capsys.readouterr()
    resumed = runs.train_run(tmp_path / "cut", cfg, None)
    assert "[toy] resuming baseline_s8_d2_h32_p4 at step 4:" in capsys.readouterr().out
    log = (resumed.path / "train.log").read_text()
    assert "resumed from" in log and "at step 4" in log and log.count("[train] model") == 2  # one log, both launches
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (straight, resumed))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert json.loads((resumed.path / "toy_run.json").read_text())["resumed"] is True
    # Cut after its final save, before its record: the next call resumes at the last step, runs
    # no step, and still reports the run's final logs (the term's state the study tabulates).
    (resumed.path / "toy_run.json").unlink()
    again = runs.train_run(tmp_path / "cut", cfg, None)
    assert resumed.final.items() <= again.final.items() and "diffusion_loss" in again.final  # (+ rates, timings)
    c = torch.load(again.checkpoint, weights_only=True)
    assert all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])
    # Cut in its first save: the relaunch says it starts again from step 0 (it has nothing to resume).
    monkeypatch.setenv("DISPERSIVE_FAULT_KILL_IN_SAVE", "2")
    with pytest.raises(RuntimeError):
        runs.train_run(tmp_path / "other", cfg, None)
    monkeypatch.delenv("DISPERSIVE_FAULT_KILL_IN_SAVE")
    capsys.readouterr()
    early = runs.train_run(tmp_path / "other", cfg, None)
    assert "[toy] relaunching baseline_s8_d2_h32_p4 (cut before its first checkpoint: from step 0)" in \
        capsys.readouterr().out
    assert "resumed from" not in (early.path / "train.log").read_text()
    d = torch.load(early.checkpoint, weights_only=True)
    assert all(torch.equal(a["ema"][k], d["ema"][k]) for k in a["ema"])
    # Another command line in the same folder is a new run: the cut one is not resumed.
    (early.path / "toy_run.json").unlink()
    other = ToyConfig.smoke(steps=8, lr=2e-3)
    capsys.readouterr()
    runs.train_run(tmp_path / "other", other, None)
    assert "[toy] training baseline_s8_d2_h32_p4" in capsys.readouterr().out
