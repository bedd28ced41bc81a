"""The optional C scanner (``sidecar/_wire.c``), decided once for the whole process.

``wire`` is the extension module, or None when it was not built (no compiler at install time)
or ``SIDECAR_PURE_PYTHON=1`` asks for the pure-Python paths — an escape hatch, and how the
tests run both implementations.
"""

from __future__ import annotations

import os
from types import ModuleType

wire: ModuleType | None = None
if os.environ.get("SIDECAR_PURE_PYTHON", "") not in ("1", "true", "yes"):
    try:
        from sidecar import _wire as wire
    except ImportError:  # pragma: no cover - built by `pip install -e .` wherever a compiler is present
        wire = None
