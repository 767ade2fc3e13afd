"""The PixelRNN stack shared by the Row LSTM and the Diagonal BiLSTM (paper, table 1):
7x7 mask-A convolution, residual recurrent layers, then ReLU + 1x1 mask-B convolution twice."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrnn.training.masks import MaskedConv2d
from pixelrnn.training.models.base import ImageModel, ModelConfig


class PixelRNN(ImageModel):
    """Subclasses name their recurrent layer: `make_layer(hidden, colour_groups) -> nn.Module`."""

    def make_layer(self, hidden: int, colour_groups: int) -> nn.Module:
        raise NotImplementedError

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.num_classes:
            raise ValueError(f"{type(self).__name__} is unconditional; use gated_pixelcnn for class labels")
        c, h, g = config.in_channels, config.hidden, config.in_channels
        self.input_conv = MaskedConv2d(c, h, 7, "A", colour_groups=g)
        self.layers = nn.ModuleList(self.make_layer(h, g) for _ in range(config.layers))
        self.head1 = MaskedConv2d(h, h, 1, "B", colour_groups=g)
        self.head2 = MaskedConv2d(h, c * self.k, 1, "B", colour_groups=g)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        h = self.input_conv(self.preprocess(x))  # (B, h, H, W)
        for layer in self.layers:
            h = layer(h)
        out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*K, H, W)
        return self.to_logits(out)


def deepen(model: PixelRNN, layers: int) -> PixelRNN:
    """A copy of `model` with `layers` recurrent layers that computes exactly the same function.

    The new layers go on top of the old ones with their residual convolutions zeroed, so each
    passes its input through (x + 0) until training moves it: a deeper model warm-started from a
    trained shallower one (Net2DeeperNet, Chen et al. 2016) instead of hours from scratch. The
    zero residual gets a gradient at once; the new layer's LSTM weights follow once it is nonzero.
    """
    old = model.config.layers
    if layers <= old:
        raise ValueError(f"deepen: the model has {old} layers already; ask for more than that, not {layers}")
    config = dataclasses.replace(model.config, layers=layers)
    deeper = type(model)(config)
    missing, unexpected = deeper.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.") and int(k.split(".")[1]) >= old for k in missing), missing
    with torch.no_grad():
        for layer in deeper.layers[old:]:
            layer.residual.weight.zero_()
            layer.residual.bias.zero_()
    return deeper
