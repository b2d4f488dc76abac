"""Exponential moving average of the model weights."""

from __future__ import annotations

import copy

import torch


class ModelEma:
    """EMA copy of a model, kept in eval mode.

    After each optimizer step, floating-point state entries are updated in place as
    ``e = decay * e + (1 - decay) * m``. Integer buffers (BN ``num_batches_tracked``, Swin
    ``relative_position_index``) are copied instead: averaging them truncates the values, which is
    what corrupts the reference's EMA ``relative_position_index``.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, device: str | None = None):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.device = device
        if device is not None:
            self.module.to(device=device)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        model_state = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = model_state[name].detach()
            if self.device is not None:
                value = value.to(device=self.device)
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
