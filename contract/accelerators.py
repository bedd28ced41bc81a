"""Which optional compiled extensions run: the one rule for every accelerator of the project.

Each compiled extension (the sidecar's wire scanners, redaction's RE2 binding) has a twin that
gives the same answers without it: a pure-Python module, or google-re2's own binding. The
extension is used when it was built and ``SIDECAR_PURE_PYTHON`` does not switch it off (what a
slim image without a compiler runs; the test suite runs once each way).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def pure_python_requested() -> bool:
    """SIDECAR_PURE_PYTHON=1 (or true / yes): use the twin of every compiled extension."""
    return os.environ.get("SIDECAR_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes")


def choose(c_module: str, fallback: "ModuleType | None") -> "ModuleType | None":
    """The compiled extension ``c_module`` when it is built and not switched off, else ``fallback``."""
    if not pure_python_requested():
        try:
            return importlib.import_module(c_module)
        except ImportError:  # built by `pip install -e .` wherever a compiler (and for RE2, libre2-dev) is present
            pass
    return fallback
