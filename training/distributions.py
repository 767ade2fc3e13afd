"""Output heads (per-channel 256-way softmax or Bernoulli) and NLL units.

Every model returns logits shaped (B, C, K, H, W): K = levels for the softmax head and K = 1
for the Bernoulli head (levels == 2, one sigmoid logit for "pixel is 1").

Sampling (the random stream and the inverse-CDF draw) lives in runtime/randomness.py, which
every sampler shares, with or without torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def logits_per_channel(levels: int) -> int:
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    return 1 if levels == 2 else levels


def log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log sigmoid(z) = -softplus(-z), written out: an exported Log(Sigmoid(z)) goes through
    onnxruntime's approximate sigmoid, whose error in tiny probabilities reaches 1e-2 in the log."""
    return -(F.relu(-z) + torch.log1p(torch.exp(-z.abs())))


def bernoulli_log_prob(logit: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log p(value) with p(1) = sigmoid(logit), as -softplus(+-logit) written out so that it
    stays finite for large logits in every backend (an exported BCE can turn into log(0) * 0)."""
    return log_sigmoid(torch.where(value.bool(), logit, -logit))


def log_prob(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """log p(x) per sub-pixel: logits (B, C, K, H, W), x (B, C, H, W) integers -> (B, C, H, W)."""
    if logits.dim() != 5 or logits.shape[2] != logits_per_channel(levels):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit {levels} levels")
    if levels == 2:
        return bernoulli_log_prob(logits[:, :, 0], x)
    # [:, :, 0], not squeeze(2): an exported squeeze on a dynamic batch is an If on the shape.
    return torch.gather(F.log_softmax(logits, dim=2), 2, x.long().unsqueeze(2))[:, :, 0]


def nll_nats(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Negative log-likelihood of each image in nats: (B,)."""
    return -log_prob(logits, x, levels).flatten(1).sum(1)


def nats_to_bits_per_dim(nats: torch.Tensor | float, dims: int):
    """Convert a per-image NLL in nats to bits per sub-pixel (C*H*W dimensions)."""
    return nats / (dims * LN2)


def average_conditionals(member_logits: list[torch.Tensor], levels: int, dim: int) -> torch.Tensor:
    """Logits of the average of several models' conditional distributions at each sub-pixel.

    member_logits: same-shaped logits, K = logits_per_channel(levels) along `dim`. The result has
    the same shape and layout: for the Bernoulli head the logit of the mean p(1), log(mean p(1)) -
    log(mean p(0)); for the softmax head the log of the mean probabilities (a softmax of them gives
    the mean back). Both in log space (logsigmoid, log_softmax, logsumexp): finite for any logits.
    """
    n = len(member_logits)
    stacked = torch.stack([z.float() for z in member_logits])  # (n, ...)
    if levels == 2:
        log_p1 = torch.logsumexp(log_sigmoid(stacked), dim=0)
        log_p0 = torch.logsumexp(log_sigmoid(-stacked), dim=0)
        return log_p1 - log_p0  # the 1/n cancels
    return torch.logsumexp(F.log_softmax(stacked, dim=dim + 1), dim=0) - math.log(n)
