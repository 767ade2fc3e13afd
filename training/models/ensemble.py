"""An ensemble of autoregressive models: at every sub-pixel, the average of its members'
conditional distributions given the same earlier sub-pixels.

Each conditional is a proper distribution and depends only on what each member may read, so the
ensemble is itself an autoregressive model with an exact likelihood, sampled like any other
(its row cell runs the members' cells side by side: export/cells/ensemble.py). Averaging per
sub-pixel, rather than mixing whole images, lets the better-informed member lead pixel by pixel:
on binarized MNIST's full validation split (2026-12-05) the Diagonal BiLSTM (81.50 nats) and the
Gated PixelCNN (81.61) give 80.67 averaged per sub-pixel, 80.95 as a mixture of whole images.

Members are single-scale models with the ensemble's image spec (a member config may leave it
out); weights are equal, so nothing is fitted on the data that scores the ensemble. `python -m pixelrnn.training.ensemble A.pt B.pt
--out E.pt` builds one from trained checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pixelrnn.training import distributions
from pixelrnn.training.models.base import IMAGE_FIELDS, ImageModel, ModelConfig

# Architectures that cannot be members: the multi-scale model's likelihood is not a product of
# per-pixel conditionals over one ordering (its grid pixels come from another model first).
NOT_MEMBERS = ("multiscale", "ensemble")


@dataclass
class EnsembleConfig(ModelConfig):
    members: list = field(default_factory=list)  # [{"arch": name, "config": {fields}}, ...]

    def validate(self) -> None:
        super().validate()
        if len(self.members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        for k, member in enumerate(self.members):
            if not isinstance(member, dict) or set(member) != {"arch", "config"}:
                raise ValueError(f"member {k}: expected {{'arch': ..., 'config': {{...}}}}, got {member!r}")
            if member["arch"] in NOT_MEMBERS:
                raise ValueError(f"member {k}: a {member['arch']} model cannot be an ensemble member")
            for name in (*IMAGE_FIELDS, "num_classes"):
                mine, theirs = getattr(self, name), member["config"].get(name, getattr(self, name))
                if theirs != mine:
                    raise ValueError(f"member {k} ({member['arch']}): {name} {theirs} differs from the ensemble's {mine}")

    def member_fields(self, k: int) -> dict:
        """Member k's config fields: the ensemble's image spec, then the member's own."""
        image = {name: getattr(self, name) for name in (*IMAGE_FIELDS, "num_classes")}
        return {**image, **self.members[k]["config"]}


class Ensemble(ImageModel):
    def __init__(self, config: EnsembleConfig):
        super().__init__(config)
        from pixelrnn.training.models import build_model  # the registry imports this module

        self.members = nn.ModuleList(build_model(m["arch"], config.member_fields(k)) for k, m in enumerate(config.members))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        logits = [member(x, labels) for member in self.members]  # each (B, C, K, H, W)
        return distributions.average_conditionals(logits, self.config.levels, dim=2)
