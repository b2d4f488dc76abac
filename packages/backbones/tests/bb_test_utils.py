"""Assertions shared by the backbone tests (importable: conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import torch


def assert_close_to_scale(actual, expected, tol=1e-5, msg=""):
    """Float32 agreement to `tol` relative to the tensor's scale (gradients sum many terms: elements near
    zero carry absolute rounding errors of the size of the large ones)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=msg)
