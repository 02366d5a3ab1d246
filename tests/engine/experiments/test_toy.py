"""The toy reproduction harness (engine.toy): pieces, and one --smoke run end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.experiments.classifier import DigitClassifier, random_shift
from engine.experiments.scoring import sample_noise_and_labels
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
