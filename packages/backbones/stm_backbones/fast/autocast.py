"""Autocast queries shared by the fast kernels and the deformable op wrapper."""

from __future__ import annotations

import torch


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (False for device types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # device types autocast does not know (meta, ...)
        return False


def reduced_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision autocast dtype if autocast is on for `device_type`, else None."""
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
