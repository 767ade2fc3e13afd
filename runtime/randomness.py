"""The project's one random stream and its numpy inverse-CDF draw (numpy only).

Sampling draws its randomness from numpy's PCG64 (`sampling_rng`) as uniforms in [0, 1), one
row of uniforms (W, C, B) per image row (`draw_row_uniforms`), and turns them into values by
inverting the CDF in float64. Every sampler in the project (the reference sampler in
training/sample.py, the row cells in torch or onnxruntime, the server's engine) consumes this
stream the same way, so the same seed gives the same image on every path.
"""
from __future__ import annotations

import numpy as np

from pixelrnn.runtime.request import check_temperature


def sampling_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def draw_row_uniforms(rng: np.random.Generator, batch: int, channels: int, width: int) -> np.ndarray:
    """The uniforms that decide one image row: (W, C, B), consumed pixel by pixel, channel by channel.

    Drawn a whole row at a time so that a stream resumed after k known rows skips exactly k draws.
    """
    return rng.random((width, channels, batch))


def sample_from_logits(logits: np.ndarray, uniforms: np.ndarray, levels: int, temperature: float = 1.0) -> np.ndarray:
    """Values (B,) int64 for one sub-pixel from logits (B, K) and uniforms (B,) by inverse CDF.

    temperature 0 means greedy (the most likely value); its rule is runtime/request.py's.
    """
    temperature = check_temperature(temperature, name="temperature")
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
