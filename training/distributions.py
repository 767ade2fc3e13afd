"""Output heads (per-channel 256-way softmax or Bernoulli), NLL units, and sampling.

Every model returns logits shaped (B, C, K, H, W): K = levels for the softmax head and K = 1
for the Bernoulli head (levels == 2, one sigmoid logit for "pixel is 1").

Sampling draws its randomness from numpy's PCG64 (`sampling_rng`) as uniforms in [0, 1) and
turns them into values by inverting the CDF in float64. Every sampler in the project (reference,
cached torch cells, onnxruntime cells inside Triton) uses this one function with the same
uniform stream, so the same seed gives the same image on every path.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def logits_per_channel(levels: int) -> int:
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    return 1 if levels == 2 else levels


def bernoulli_log_prob(logit: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log p(value) with p(1) = sigmoid(logit), as -softplus(+-logit) written out so that it
    stays finite for large logits in every backend (an exported BCE can turn into log(0) * 0)."""
    z = torch.where(value.bool(), -logit, logit)
    return -(F.relu(z) + torch.log1p(torch.exp(-z.abs())))


def log_prob(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """log p(x) per sub-pixel: logits (B, C, K, H, W), x (B, C, H, W) integers -> (B, C, H, W)."""
    if logits.dim() != 5 or logits.shape[2] != logits_per_channel(levels):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit {levels} levels")
    if levels == 2:
        return bernoulli_log_prob(logits[:, :, 0], x)
    return torch.gather(F.log_softmax(logits, dim=2), 2, x.long().unsqueeze(2)).squeeze(2)


def nll_nats(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Negative log-likelihood of each image in nats: (B,)."""
    return -log_prob(logits, x, levels).flatten(1).sum(1)


def nats_to_bits_per_dim(nats: torch.Tensor | float, dims: int):
    """Convert a per-image NLL in nats to bits per sub-pixel (C*H*W dimensions)."""
    return nats / (dims * LN2)


def sampling_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def draw_row_uniforms(rng: np.random.Generator, batch: int, channels: int, width: int) -> np.ndarray:
    """The uniforms that decide one image row: (W, C, B), consumed pixel by pixel, channel by channel.

    Drawn a whole row at a time so that a stream resumed after k known rows skips exactly k draws.
    """
    return rng.random((width, channels, batch))


def sample_from_logits(logits: np.ndarray, uniforms: np.ndarray, levels: int, temperature: float = 1.0) -> np.ndarray:
    """Values (B,) int64 for one sub-pixel from logits (B, K) and uniforms (B,) by inverse CDF.

    temperature 0 means greedy (the most likely value).
    """
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    logits = np.asarray(logits, dtype=np.float64)
    if levels == 2:
        l = logits[:, 0]
        if temperature == 0:
            return (l > 0).astype(np.int64)
        p1 = 1.0 / (1.0 + np.exp(-l / temperature))
        return (uniforms < p1).astype(np.int64)
    if temperature == 0:
        return logits.argmax(axis=1).astype(np.int64)
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=1)
    # The first level whose CDF exceeds u * total; clip guards against rounding at the top.
    idx = (cdf < (uniforms * cdf[:, -1])[:, None]).sum(axis=1)
    return np.minimum(idx, levels - 1).astype(np.int64)
