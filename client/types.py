"""What the client library returns and raises, and what it reads of a model from its config
(client/library.py uses them; they need neither a server nor tritonclient)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pixelrnn.runtime import protocol as p


class ClientError(RuntimeError):
    """The server could not be used or refused a request; str() is one line saying why."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the server wrote


class ServerGone(ClientError):
    """The server cannot be reached or went away mid-stream: a restart may bring it back."""


class Unauthenticated(ClientError):
    """The server (a proxy with a token: server/proxy.py) refused the call: no token, or another."""


class ServerBusy(ClientError):
    """The sampler is at its live-images budget and refused the sequence: try again later."""


class Row(NamedTuple):
    index: int  # the row within its stage
    stage: int  # 0; multi-scale: 0 the small image, 1 the full one
    pixels: np.ndarray  # uint8 (n, C, W_stage)
    logprob: np.ndarray  # float32 (n,), log p of the row


class Scores(NamedTuple):
    nll_nats: np.ndarray  # float32 (N,), -log p(image) in nats
    bits_per_dim: np.ndarray  # float32 (N,)
    pixel_nll: np.ndarray | None = None  # float32 (N, C, H, W) nats of each sub-pixel, when asked for


class OodScores(NamedTuple):
    """NAME_ood's answer per image (runtime/protocol.py, runtime/ood.py): higher scores mean
    more out of distribution; `ood` is the served verdict at the model's calibrated threshold."""
    nll_nats: np.ndarray  # float32 (N,), -log p(x) under the model (marginal over classes)
    background_nll_nats: np.ndarray  # float32 (N,), under the background model
    llr: np.ndarray  # float32 (N,), nll_nats - background_nll_nats
    complexity: np.ndarray  # float32 (N,), NLL in bits minus a lossless compression's bits
    ood: np.ndarray  # bool (N,)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    max_batch: int  # images per score request and per sampling sequence
    conditional: bool  # takes LABELS
    levels: int | None = None  # None: the server's config does not say
    num_classes: int | None = None
    stage_rows: tuple[int, ...] | None = None  # rows streamed per stage

    @property
    def rows(self) -> int | None:
        """Rows one sequence streams (all stages), if known."""
        return sum(self.stage_rows) if self.stage_rows else None


def model_info(name: str, config: dict) -> ModelInfo:
    """ModelInfo from NAME_score's config (tritonclient's get_model_config(as_json=True)["config"])."""
    inputs = {i["name"]: i for i in config.get("input", [])}
    images = inputs.get(p.IMAGES)
    dims = [int(d) for d in images.get("dims", [])] if images else []
    if images is None or images.get("data_type") != "TYPE_UINT8" or len(dims) != 3 or min(dims) < 1:
        raise ClientError(f"{p.score_model(name)} does not look like a PixelRNN scorer (no uint8 {p.IMAGES} C x H x W input)")
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

    def number(key: str) -> int | None:
        try:
            return int(params[key]) if key in params else None
        except ValueError:
            raise ClientError(f"{p.score_model(name)}: config parameter {key}={params[key]!r} is not a number") from None

    stage_rows = None
    if params.get("stage_rows"):
        try:
            stage_rows = tuple(int(r) for r in params["stage_rows"].split(","))
        except ValueError:
            raise ClientError(f"{p.score_model(name)}: config parameter stage_rows={params['stage_rows']!r} is not a list of rows") from None
    return ModelInfo(name=name, shape=tuple(dims), max_batch=max(1, int(config.get("max_batch_size", 1))),
                     conditional=p.LABELS in inputs, levels=number("levels"), num_classes=number("num_classes") or None,
                     stage_rows=stage_rows)
