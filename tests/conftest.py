"""Shared test fixtures: the release fixtures file and a fresh seed per test."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before
# triton is first imported (torch._dynamo imports it): set it here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The release fixtures ship with the repository (tests/fixtures/README.md says how they were
# made); DISP_FIXTURES points the suite at another copy.
FIXTURES = Path(os.environ.get("DISP_FIXTURES") or REPO / "tests" / "fixtures")


def fixture_path(name: str) -> Path:
    """A file of the fixtures folder; a clear error when it is missing."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"release fixture {name} not found in {FIXTURES} "
                                "(tests/fixtures in the repository, or DISP_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def release_fixtures() -> dict:
    return torch.load(fixture_path("official_reference_seed0.pt"), weights_only=True)


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test's own name: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def dit(release_fixtures):
    """The DiT release's tiny fixture model (learned sigma), in eval mode."""
    import models

    model = models.create_model("dit_s", **release_fixtures["config"]).eval()
    model.load_state_dict(release_fixtures["dit_state_dict"])
    return model
