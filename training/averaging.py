"""An exponential moving average of a model's weights (Polyak averaging) for `training.train --ema`.

The averaged weights often score a few tenths of a nat better than the raw ones at no training
cost, so a run evaluates both and keeps whichever validates better in best.pt. torch's
AveragedModel does the averaging; this wrapper only adds what a resumable run needs: its state
in a checkpoint and back.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be in (0, 1), got {decay}")
        self.decay = decay
        # use_buffers: the masks are buffers; averaging constants leaves them as they are.
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.average.eval()

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, with the raw model's class and config."""
        return self.average.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.average.update_parameters(model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "n_averaged": int(self.average.n_averaged)}

    def load_state_dict(self, state: dict) -> None:
        if abs(float(state["decay"]) - self.decay) > 1e-12:
            raise ValueError(f"the run averages with --ema {state['decay']}, not {self.decay}")
        self.module.load_state_dict(state["model"], strict=True)
        self.average.n_averaged.fill_(int(state["n_averaged"]))
