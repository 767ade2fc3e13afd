"""An uploaded picture -> one image of a model's levels (C, H, W), or a one-line reason why not.

The page uploads PNGs (a drawing saved elsewhere, a digit photographed and cropped). Any size is
accepted and scaled to the model's H x W (box filter: the mean of each cell, as a digit shrunk to
28 x 28), converted to grey or RGB as the model wants, and quantized to its levels as every PNG
the project reads is (runtime.images.from_display). What is not a PNG, or is too large, is refused:
the gateway turns UploadError into a 4xx with its message.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from pixelrnn.runtime.images import from_display
from pixelrnn.web.limits import mib

MAX_BYTES = 2 * 1024 * 1024  # a PNG of a small picture is far below; more is a mistake or abuse
MAX_PIXELS = 4096 * 4096  # decompression-bomb guard: PIL's own limit only warns below 2x its value
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UploadError(ValueError):
    """Not an image the model can take; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def to_levels(data: bytes, shape: tuple[int, int, int], levels: int) -> np.ndarray:
    """PNG bytes -> uint8 levels (C, H, W) for a model of this shape and number of levels."""
    if len(data) > MAX_BYTES:
        raise UploadError(f"the upload is {mib(len(data))}; at most {mib(MAX_BYTES)} is accepted", 413)
    if not data:
        raise UploadError("the upload is empty: choose a PNG file")
    if not data.startswith(PNG_SIGNATURE):
        raise UploadError("the upload is not a PNG image (give a .png file)")
    c, h, w = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UploadError(f"the PNG is {img.width} x {img.height} pixels; at most {MAX_PIXELS} pixels are accepted", 413)
                img.load()
                img = img.convert("RGB" if c == 3 else "L")
    except UploadError:
        raise
    except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UploadError(f"the PNG cannot be read ({e})") from None
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float64)  # (H, W) grey or (H, W, 3)
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)  # -> (C, H, W)
    return from_display(arr, levels)
