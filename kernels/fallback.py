"""One warning per distinct fallback (a fast path the device or install cannot run), not one per call.

The set of reported keys is process-wide on purpose: it only remembers which warnings were already shown.
"""

from __future__ import annotations

import logging
import warnings

_log = logging.getLogger("diffgentor.kernels")
_reported: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _reported:
        _reported.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _log.warning(msg)
