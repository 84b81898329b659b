"""The synthetic data set an experiment runs on, made once into its directory and reused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any


def made_once(path: str, marker: str, params: dict[str, Any], make: Callable[[], None]) -> bool:
    """``make()`` the data set in ``path`` unless ``path/marker`` says it was made with ``params``
    (a directory made otherwise is removed first); True when it was made now."""
    marker_path = os.path.join(path, marker)
    if os.path.exists(marker_path):
        with open(marker_path, encoding="utf-8") as handle:
            if json.load(handle) == params:
                return False
    if os.path.isdir(path):
        shutil.rmtree(path)
    make()
    with open(marker_path, "w", encoding="utf-8") as handle:
        json.dump(params, handle)
    return True
