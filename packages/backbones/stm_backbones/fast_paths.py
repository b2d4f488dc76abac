"""The one switch for the blocks' fast kernels (as timm's `use_fused_attn()` is for fused attention).

Every mixer block has two forwards computing the same function: the plain PyTorch formulation, written
in its model file as the math reads in the paper, and a fast path built from the kernels in
`stm_backbones.fast` (fused residual GEMMs, the chunked GELU MLP, token gathers instead of rolls and
window views, a depth-wise weight gradient at convolution speed, ...). The block asks `enabled()`.

Off switches (the plain formulation everywhere):

* `set_fast_paths(False)`, or `with fast_paths(False): ...` for a region of code;
* the environment variable `STM_FAST_PATHS=0` (read at import).

Tracing is handled here and nowhere else:

* `enabled()` is False while `torch.jit.trace` / `torch.jit.script` run (fvcore's FLOP counter,
  TorchScript): they see the plain operators, so FLOPs are counted on the formulation of the paper;
* `eager_kernels()` is additionally False under `torch.compile` / `torch.export` tracing: the custom
  eager kernels (hand-chunked MLP, in-place accumulation, short-row softmax) would only hide from
  Inductor the element-wise work it fuses better itself. The structural fast paths (token gathers,
  folded sampling, the custom autograd Functions) stay on under compile, where they are also faster.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = ["ENV_VAR", "compiling", "eager_kernels", "enabled", "exporting", "fast_paths", "is_tracing", "reshape_copy",
           "set_fast_paths"]

ENV_VAR = "STM_FAST_PATHS"


def _from_env() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_VAR} must be 1 or 0 (true/false, on/off), got {os.environ[ENV_VAR]!r}")


_state = {"enabled": _from_env()}


def set_fast_paths(enable: bool) -> bool:
    """Turn the fast kernels on or off for the whole process; returns the previous setting."""
    previous = _state["enabled"]
    _state["enabled"] = bool(enable)
    return previous


@contextlib.contextmanager
def fast_paths(enable: bool) -> Iterator[None]:
    """`with fast_paths(False): model(x)` runs the plain formulation of every block (restored on exit)."""
    previous = set_fast_paths(enable)
    try:
        yield
    finally:
        set_fast_paths(previous)


def is_tracing() -> bool:
    """TorchScript tracing or scripting (fvcore's FLOP counter traces with torch.jit)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def compiling() -> bool:
    """torch.compile / torch.export tracing (Dynamo)."""
    return torch.compiler.is_compiling()


def exporting() -> bool:
    """torch.export tracing (the ONNX exporter included)."""
    return torch.compiler.is_exporting()


def enabled() -> bool:
    """Whether blocks take their fast path: switched on, and not under TorchScript tracing/scripting."""
    return _state["enabled"] and not is_tracing()


def eager_kernels() -> bool:
    """Whether the eager-only kernels run: `enabled()` and not under torch.compile / torch.export."""
    return enabled() and not compiling()


def reshape_copy(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`x.reshape(shape)` for a non-viewable `x` (eager copies it). While torch.export traces, the copy is an
    explicit clone: with a symbolic batch size the fake tensor can pass for contiguous, and the ONNX exporter's
    decompositions then turn the reshape into a view that the real strides cannot take. Same values either way."""
    if exporting():
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(shape)
