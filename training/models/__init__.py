"""Model registry: build any architecture by name from a plain config dict.

A checkpoint stores {"arch": name, "config": dict}; `build_model` turns that back into the
network, so export and serving need nothing but the file.
"""
from __future__ import annotations

import dataclasses

from pixelrnn.training.models.base import ImageModel, ModelConfig
from pixelrnn.training.models.diagonal_bilstm import DiagonalBiLSTM, DiagonalBiLSTMConfig
from pixelrnn.training.models.ensemble import Ensemble, EnsembleConfig
from pixelrnn.training.models.gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from pixelrnn.training.models.multiscale import MultiScale, MultiScaleConfig
from pixelrnn.training.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixelrnn.training.models.row_lstm import RowLSTM, RowLSTMConfig

ARCHITECTURES: dict[str, tuple[type[ModelConfig], type[ImageModel]]] = {
    "pixelcnn": (PixelCNNConfig, PixelCNN),
    "row_lstm": (RowLSTMConfig, RowLSTM),
    "diagonal_bilstm": (DiagonalBiLSTMConfig, DiagonalBiLSTM),
    "gated_pixelcnn": (GatedPixelCNNConfig, GatedPixelCNN),
    "multiscale": (MultiScaleConfig, MultiScale),
    "ensemble": (EnsembleConfig, Ensemble),
}


def config_class(arch: str) -> type[ModelConfig]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch][0]


def make_config(arch: str, **fields) -> ModelConfig:
    cls = config_class(arch)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{arch} config has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**fields)


def build_model(arch: str, config: ModelConfig | dict) -> ImageModel:
    if isinstance(config, dict):
        config = make_config(arch, **config)
    return ARCHITECTURES[arch][1](config)
