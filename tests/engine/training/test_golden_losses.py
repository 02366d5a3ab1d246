"""Numerics regression: the per-step losses of tiny runs against a golden file (torchtitan's habit).

A refactor must leave every logged loss where it was; a real change of the numbers regenerates
the file on purpose: ``DISP_WRITE_GOLDEN=1 pytest tests/engine/training/test_golden_losses.py`` (then commit it,
saying why the numbers moved).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO
from tests.engine_helpers import TINY, metrics, run_engine

pytestmark = pytest.mark.slow
GOLDEN = REPO / "tests" / "fixtures" / "golden_losses.json"
KEYS = ("diffusion_loss", "dispersive_total", "grad_norm")
COMMON = [*TINY, "--data", "digits", "--global-batch", "16", "--log-every", "1", "--ema-decay", "0.5",
          "--zero-stage", "2", "--seed", "7"]
RUNS = {
    "sit_release": ["--max-steps", "6"],
    "sit_all_blocks_gvp": ["--max-steps", "6", "--disp-blocks", "all", "--transport-path", "gvp",
                           "--transport-prediction", "noise", "--transport-loss-weight", "likelihood"],
    "dit_paper": ["--max-steps", "6", "--model", "dit_s", "--depth", "4", "--disp-preset", "paper"],
    "meanflow": ["--max-steps", "4", "--objective", "meanflow", "--mf-omega", "0.5", "--mf-kappa", "0.5"],
}


def _curve(tmp_path, name: str) -> dict[str, list[float]]:
    out = tmp_path / name
    run_engine([*COMMON, *RUNS[name], "--results-dir", str(out)])
    records = metrics(out)
    return {key: [r[key] for r in records] for key in KEYS if key in records[0]}


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_match_the_golden_file(tmp_path, name):
    curve = _curve(tmp_path, name)
    if os.environ.get("DISP_WRITE_GOLDEN") == "1":
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = {"argv": [*COMMON, *RUNS[name]], **curve}
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {name} into {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())[name]
    assert golden["argv"] == [*COMMON, *RUNS[name]], "the run's flags changed: regenerate on purpose"
    for key, values in curve.items():
        # CPU runs of one machine type reproduce to the bit; the tolerance only absorbs another
        # BLAS code path, far below what any change of the objective, data order or seeds moves.
        assert values == pytest.approx(golden[key], rel=1e-4, abs=1e-6), (name, key)
