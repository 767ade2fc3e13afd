"""Image grids (PNG) for samples and completions, and reading PNG / .npy images back, for
training, the client and the web gateway alike.

Images inside the project are integer levels in [0, levels) shaped (N, C, H, W); only here are
they scaled to 0..255 for viewing (and back, when a PNG is read for a model with fewer levels).
numpy at import; pillow only inside the functions that write or read PNGs, so a deployed model
repository's environment (numpy + onnxruntime) could import this module.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PAD_VALUE = 255  # white separators between grid cells


def to_display(images: np.ndarray, levels: int) -> np.ndarray:
    """Levels (N, C, H, W) -> uint8 0..255 (N, C, H, W); levels == 256 is the identity."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C 1 or 3, got shape {images.shape}")
    if levels < 2 or levels > 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    if images.size and (images.min() < 0 or images.max() >= levels):
        raise ValueError(f"image values must be in [0, {levels}), found {images.min()}..{images.max()}")
    return np.rint(images.astype(np.float64) * 255.0 / (levels - 1)).astype(np.uint8)


def grid_array(images: np.ndarray, levels: int, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile images row-major, `nrow` per grid row, into (H', W', C) uint8.

    Size: W' = nrow * (W + pad) + pad and H' = rows * (H + pad) + pad.
    """
    shown = to_display(images, levels)
    n, c, h, w = shown.shape
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    rows = max(1, math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), PAD_VALUE, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = shown[k].transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return grid


def nll_heatmap(pixel_nll: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Per-pixel NLL (N, C, H, W), nats, summed over channels -> RGB uint8 (N, H, W, 3) on a
    black-red-yellow-white ramp from 0 to `vmax` (default: the largest value, so the images of
    one call share a scale). Where the model was surprised shows bright."""
    heat = np.asarray(pixel_nll, np.float64).sum(axis=1)  # (N, H, W)
    top = float(vmax if vmax is not None else heat.max(initial=0.0)) or 1.0
    t = np.clip(heat / top, 0.0, 1.0)[..., None] * 3  # one third of the ramp per primary
    return (np.clip(t - np.array([0.0, 1.0, 2.0]), 0.0, 1.0) * 255).round().astype(np.uint8)


def save_rgb(image: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an RGB uint8 (H, W, 3) image as PNG, each pixel enlarged to scale x scale."""
    from PIL import Image

    image = np.asarray(image)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_grid(images: np.ndarray, levels: int, path: str | Path, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Path:
    """Write a PNG grid of `images` (uint8 levels (N, C, H, W)); nrow defaults to ~sqrt(N).
    `scale` enlarges every grid pixel to scale x scale (28x28 digits are tiny on a screen)."""
    from PIL import Image

    images = np.asarray(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = grid_array(images, levels, nrow, pad)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return path


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            else:
                arr = np.asarray(img.convert("L"))[None]  # (1, H, W)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return arr[None].astype(np.uint8)


def from_display(values: np.ndarray, levels: int) -> np.ndarray:
    """0..255 display values -> uint8 levels in [0, levels): the inverse of `to_display`."""
    return np.rint(np.asarray(values, dtype=np.float64) * (levels - 1) / 255.0).astype(np.uint8)


def _read_npy(path: Path, shape: tuple[int, int, int] | None) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if shape is not None and shape[0] == 1 and arr.ndim == 3 and arr.shape[1:] == tuple(shape[1:]):
        arr = arr[:, None]  # a grey model's (N, H, W) is N images, not one of N channels
    elif arr.ndim == 2:
        arr = arr[None, None]  # (H, W) -> (1, 1, H, W)
    elif arr.ndim == 3:
        arr = arr[None]  # (C, H, W) -> (1, C, H, W)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"{path}: expected (H, W), (C, H, W) or (N, C, H, W) with C 1 or 3, got {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    integral = np.issubdtype(arr.dtype, np.integer) or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))
    if not integral:
        raise ValueError(f"{path}: values must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def read_image_file(path: str | Path, levels: int | None = None, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """One PNG or .npy file -> uint8 (N, C, H, W).

    PNGs hold 0..255 display values: with `levels` they are mapped to [0, levels). .npy files are
    taken to hold levels already and are only range-checked; (H, W) and (C, H, W) arrays are one
    image, and given the model's `shape` (C, H, W) with C = 1, (N, H, W) is N grey images.
    """
    path = Path(path)
    if path.suffix.lower() != ".npy":
        arr = _read_png(path)
        return from_display(arr, levels) if levels is not None else arr
    arr = _read_npy(path, shape)
    if levels is not None and arr.size and (arr.min() < 0 or arr.max() >= levels):
        raise ValueError(f"{path}: values {arr.min()}..{arr.max()} are outside [0, {levels})")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{path}: values {arr.min()}..{arr.max()} do not fit uint8")
    return arr.astype(np.uint8)


def load_images(paths, levels: int | None = None, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Read PNG / .npy files (see `read_image_file`) into one uint8 array (N, C, H, W)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    arrays = [read_image_file(p, levels, shape) for p in paths]
    if not arrays:
        raise ValueError("no image files given")
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images differ in shape: {', '.join(str(s) for s in sorted(shapes))}")
    return np.concatenate(arrays)


OCCLUDED_GREY = 128  # display value of the hidden rows in a completion grid


def completion_grid(originals: np.ndarray, completions: np.ndarray, levels: int, known_rows: int, k: int) -> np.ndarray:
    """Display images (0..255) in rows of: original | occluded | k completions."""
    shown = to_display(originals, levels)
    occluded = shown.copy()
    occluded[:, :, known_rows:] = OCCLUDED_GREY
    done = to_display(completions, levels).reshape((len(originals), k) + completions.shape[1:])
    rows = [np.concatenate([shown[e:e + 1], occluded[e:e + 1], done[e]]) for e in range(len(originals))]
    return np.concatenate(rows)
