"""The release fixtures ship inside the repository: a bare clone tests release parity."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import torch

from tests.conftest import FIXTURES, REPO


def _documented_sums() -> dict[str, str]:
    text = (REPO / "tests" / "fixtures" / "README.md").read_text()
    return dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", text))


def test_default_fixture_folder_is_inside_the_repository():
    env = {k: v for k, v in os.environ.items() if k != "DISP_FIXTURES"}
    out = subprocess.run([sys.executable, "-c", "from tests.conftest import FIXTURES; print(FIXTURES)"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(REPO / "tests" / "fixtures")


def test_override_points_elsewhere(tmp_path):
    env = {**os.environ, "DISP_FIXTURES": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from tests.conftest import FIXTURES; print(FIXTURES)"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(tmp_path)


def test_shipped_files_match_their_documented_checksums():
    sums = _documented_sums()
    assert {"official_reference_seed0.pt", "sit_xl_2_state_dict_keys.txt"} <= set(sums)
    for name, digest in sums.items():
        path = REPO / "tests" / "fixtures" / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name


def test_fixture_file_loads_safely_with_every_documented_key():
    data = torch.load(REPO / "tests" / "fixtures" / "official_reference_seed0.pt", weights_only=True)
    readme = (REPO / "tests" / "fixtures" / "README.md").read_text()
    for key in data:
        assert f"`{key}`" in readme, f"fixture key {key} is not documented"


def test_no_test_reads_outside_the_repository():
    """Nothing in tests/ or bench/ builds a path to the repository's parent (``../shared``)."""
    offenders = []
    for folder in ("tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "test_fixtures.py":  # this file spells the patterns out
                continue
            text = path.read_text()
            if re.search(r"parents\[1\]\.parent|\.\./shared|\"shared\" */", text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], offenders
    assert FIXTURES.is_dir()
