"""Settings pinned to an output folder: a rerun must match them before it adds to the folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def differing_settings(path: Path, settings: dict[str, Any]) -> list[str] | None:
    """The keys where ``settings`` and the JSON at ``path`` differ (sorted; [] when they match),
    or None when nothing is pinned there yet."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    return sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))


def write_json_atomic(path: Path, obj: Any) -> None:
    """The JSON file whole or absent, never half-written (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
