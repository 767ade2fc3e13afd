"""What a sampling request may ask for: one rule per field of NAME_sample's requests
(runtime/protocol.py), checked the same way wherever a request is made or taken: the web
gateway, the Python client, the server's engine and the row loop.

    BATCH_SIZE         a whole number in [1, max_batch] (the model's max batch)
    TEMPERATURE        0 (greedy), or a finite number in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    SEED               a whole number in [0, 2**64)
    LABELS             class-conditional models only: 1 class id (for every image) or one per
                       image, each in [0, num_classes)
    KNOWN              B x C x R x W known rows (R <= H), values in [0, levels)
    MAX_ROWS           None (every row left) or a whole number >= 0
    ROWS_PER_RESPONSE  None (no limit) or a whole number >= 1

Each check returns the value as the sampler uses it (a Python int or float, an int64 array) or
raises RequestError, a ValueError whose message is one line naming the field and the bad value.
`name` is the field as the caller's user knows it: the protocol's input name by default, the
argument or JSON key ("temperature") in the client and the gateway.

numpy only, and nothing of the project outside runtime/: deployed model repositories carry it.
"""
from __future__ import annotations

import math

import numpy as np

from pixelrnn.runtime.protocol import BATCH_SIZE, IMAGES, KNOWN, LABELS, MAX_ROWS, ROWS_PER_RESPONSE, SEED, TEMPERATURE

# Below this a T > 0 makes logits / T overflow to inf (at 5e-324) or lose the softmax to
# rounding: the row would be neither sampled nor greedy. 1e-6 is far from that and already
# samples as greedy decoding does.
MIN_TEMPERATURE = 1e-6
# Above this every model's samples are noise: a typo is likelier than a wish. The web page's
# field has the same bound.
MAX_TEMPERATURE = 5.0
SEED_LIMIT = 2**64  # SEED is a uint64 on the wire
BYTE_LEVELS = 256  # KNOWN is uint8 on the wire: the bound on its values where the model's levels are not known


class RequestError(ValueError):
    """A field of a sampling request breaks its rule; str() is one line naming it and the value."""


def _shown(value) -> str:
    """A bad value as one short line: numbers as written, anything else as its repr."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    text = str(value) if isinstance(value, (int, float)) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _whole_array(value, name: str) -> np.ndarray:
    """An array of whole numbers (integer-valued floats and bools too) as int64."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(f"{name} must be an array of whole numbers, got {_shown(value)}") from None
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise RequestError(f"{name} must be whole numbers, got {arr.dtype} {_shown(arr.reshape(-1)[:8].tolist())}")


def _whole_in(value, low: int, high: int | None, name: str) -> int:
    """A whole number in [low, high] (high None: no upper bound), or one line saying which rule failed."""
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if not _is_whole(value):
        raise RequestError(f"{name} must be a whole number {bound}, got {_shown(value)}")
    if value < low or (high is not None and value > high):
        raise RequestError(f"{name} must be {bound}, got {_shown(value)}")
    return int(value)


def check_batch(value, max_batch: int | None = None, name: str = BATCH_SIZE) -> int:
    """Images in one sequence: 1 to `max_batch` (None: no upper bound here)."""
    return _whole_in(value, 1, max_batch, name)


def check_temperature(value, name: str = TEMPERATURE) -> float:
    """0 is greedy decoding (-0.0 too); else a finite number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if _is_real(value):
        t = float(value)
        if t == 0:
            return 0.0
        if math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            return t
    raise RequestError(f"{name} must be 0 (greedy) or a finite number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                       f"got {_shown(value)}")


def check_seed(value, name: str = SEED) -> int:
    """The random stream's seed: a whole number in [0, 2**64)."""
    if not (_is_whole(value) and 0 <= value < SEED_LIMIT):
        raise RequestError(f"{name} must be a whole number in [0, 2**64), got {_shown(value)}")
    return int(value)


def check_labels(value, batch: int, num_classes: int | None, name: str = LABELS) -> np.ndarray | None:
    """Class ids -> int64 (batch,), one id standing for every image. `num_classes`: 0 for a
    model that is not class-conditional (no labels then: None), None for a conditional one whose
    class count is not known (ids only checked >= 0)."""
    if num_classes == 0:
        if value is not None:
            raise RequestError(f"this model is not class-conditional: do not send {name}")
        return None
    if value is None:
        raise RequestError(f"this model is class-conditional: {name} (one class id, or one per image) is required")
    labels = _whole_array(value, name).reshape(-1)
    if labels.size == 1:
        labels = np.repeat(labels, batch)
    if labels.shape != (batch,):
        raise RequestError(f"{name} must hold 1 class id or one per image ({batch}), got {labels.size}")
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        bound = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        raise RequestError(f"{name} must be {bound}, got {_shown(labels.tolist())}")
    return labels


def check_known_rows(value, height: int | None = None, name: str = "known_rows") -> int:
    """How many rows of each image are known: 0 to the image's `height` (None: not bounded here)."""
    return _whole_in(value, 0, height, name)


def check_known(value, batch: int, shape: tuple[int, int, int], levels: int | None, name: str = KNOWN) -> np.ndarray | None:
    """Known rows B x C x R x W (R <= H, shape = (C, H, W)) -> int64; values in [0, levels)
    (levels None: not known, values in [0, 256), what a uint8 KNOWN carries). None: no known rows."""
    if value is None:
        return None
    c, h, w = shape
    try:
        dims = np.shape(value)
    except (ValueError, TypeError):
        dims = ()
    if len(dims) != 4 or dims[0] != batch or dims[1] != c or dims[3] != w or dims[2] > h:
        got = " x ".join(map(str, dims)) or _shown(value)
        raise RequestError(f"{name} must be {batch} x {c} x R x {w} (R <= {h} known rows), got {got}")
    known = _whole_array(value, f"{name} values")
    high, note = (levels, " (the model's levels)") if levels else (BYTE_LEVELS, " (one byte)")
    if known.size and int(known.max()) >= high:
        raise RequestError(f"{name} values must be < {high}{note}, got {int(known.max())}")
    if known.size and int(known.min()) < 0:
        raise RequestError(f"{name} values must be >= 0, got {int(known.min())}")
    return known


def check_max_rows(value, name: str = MAX_ROWS) -> int | None:
    """Rows this request asks for: None (every row left) or a whole number >= 0 (0: none)."""
    if value is None:
        return None
    if not _is_whole(value):
        raise RequestError(f"{name} must be a whole number >= 0 (or none: every row left), got {_shown(value)}")
    if value < 0:
        raise RequestError(f"{name} must be >= 0, got {_shown(value)}")
    return int(value)


def check_rows_per_response(value, name: str = ROWS_PER_RESPONSE) -> int | None:
    """Most rows one response may carry: None (no limit) or a whole number >= 1 (1: one per row)."""
    if value is None:
        return None
    if not _is_whole(value):
        raise RequestError(f"{name} must be a whole number >= 1 (1: one response per row; or none: no limit), "
                           f"got {_shown(value)}")
    if value < 1:
        raise RequestError(f"{name} must be >= 1 (1: one response per row), got {_shown(value)}")
    return int(value)


def score_images(images: np.ndarray | None, levels: int) -> np.ndarray:
    """The IMAGES of a scoring request (NAME_score, NAME_ood), uint8 (N, C, H, W), checked to be
    there and to lie below the model's `levels`. Triton has checked the dtype and the shape
    against the config, but it checks required inputs by their count only: a class-conditional
    scorer's request with LABELS alone reaches the model without images (None)."""
    if images is None:
        raise RequestError(f"send the images as {IMAGES} (uint8 N x C x H x W)")
    if images.size and int(images.max()) >= levels:
        raise RequestError(f"{IMAGES} values must be in [0, {levels}) (the model's levels), got {int(images.max())}")
    return images
