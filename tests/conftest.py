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
FIXTURES = Path(os.environ.get("DISP_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def release_fixtures() -> dict:
    path = FIXTURES / "official_reference_seed0.pt"
    if not path.exists():
        raise FileNotFoundError(f"release fixtures not found at {path}; set DISP_FIXTURES to the folder")
    return torch.load(path, weights_only=True)


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
