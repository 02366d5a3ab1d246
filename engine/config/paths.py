"""Repository paths: the one place that knows where this file sits in the checkout."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"            # ignored: caches, built-in datasets
DATA_CACHE = BUILD_DIR / "data"            # the built-in datasets (digits, synthetic)
ASSETS_DIR = REPO_ROOT / "engine" / "assets"  # pictures the README shows
