"""Named image data sets, read from local files only (nothing is downloaded).

Every source yields an `ImageSet`: uint8 images (N, C, H, W) holding integer levels in
[0, levels), optional int64 labels, and the number of levels. Sources, by the name users pass
as `--data`:

- `binarized-mnist`: the standard binarized MNIST (train 50k / valid 10k / test), one .npz per
  split with an `images` array N x 28 x 28 in {0, 1}, in --data-dir, else $BINARIZED_MNIST_DIR,
  else a checkout's ../shared/data/binarized_mnist (see `binarized_mnist_dir`).
- `fashion-mnist`: Debian's dataset-fashion-mnist IDX files under
  /usr/share/datasets/fashion-mnist/ (override with --data-dir); train = first 50k of the
  training file, valid = its last 10k, test = the t10k file; quantized to `bits` bits.
- `fashion-mnist-binary`: the same images binarized (fixed threshold or stochastic).
- `mnist`: the grey MNIST digits, test split only (10k, IDX), quantized to `bits` bits: an
  out-of-distribution set for Fashion-MNIST models; in --data-dir, else $MNIST_DIR, else a
  checkout's ../shared/data/mnist.
- `rgb-patches`: 32 x 32 colour patches cut from the photographs scikit-image ships; train,
  valid and test come from different photographs.
- `synthetic`: a tiny generated set of bars and boxes for fast tests.

numpy only at import (scikit-image is imported by `rgb-patches` alone), so the client reads data
sets without the training stack.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BINARIZED_MNIST_ENV = "BINARIZED_MNIST_DIR"
CHECKOUT_BINARIZED_MNIST = Path("../shared/data/binarized_mnist")  # relative to a checkout's root
MNIST_ENV = "MNIST_DIR"
CHECKOUT_MNIST = Path("../shared/data/mnist")
# The checkout this file runs from, if any: a pip install puts it under site-packages, with no
# pyproject.toml beside it, and nothing near it is the project's data.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


class DataError(ValueError):
    """A data file is missing, truncated or corrupt, or a data spec is invalid."""


@dataclass
class DataSpec:
    name: str
    data_dir: str | None = None
    bits: int = 8  # quantization of grey / colour sources: levels = 2**bits
    binarize: str = "threshold"  # fashion-mnist-binary: "threshold" (at half range) or "stochastic"
    size: int = 32  # rgb-patches / synthetic image side
    channels: int = 1  # synthetic only
    count: int = 0  # rgb-patches / synthetic: images per split (0 = source default)
    seed: int = 0  # stochastic binarization, patch positions, synthetic content
    # Only the images of these classes (labelled sources), labels unchanged: a model of part of a
    # data set, whose other classes then stand in for images it has never seen.
    classes: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, C, H, W), values in [0, levels)
    labels: np.ndarray | None  # int64 (N,) or None
    levels: int
    num_classes: int
    description: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# ---------------------------------------------------------------------------- file readers

def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) of unsigned bytes, e.g. MNIST / Fashion-MNIST."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims))
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says {dims} = {expected} bytes of data, found {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_npz_images(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path}: no array named 'images' (found {', '.join(archive.files) or 'none'})")
            images = archive["images"]
    except DataError:
        raise
    except Exception as e:  # zipfile / pickle / EOF errors all mean the same thing to a user
        raise DataError(f"{path}: unreadable or corrupt .npz ({type(e).__name__}: {e})") from None
    if images.ndim != 3:
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected N x H x W")
    return images


# ---------------------------------------------------------------------------- transforms

def quantize(images: np.ndarray, bits: int) -> np.ndarray:
    """8-bit values -> `bits`-bit levels (the top bits), as uint8."""
    if not 1 <= bits <= 8:
        raise DataError(f"bits must be in 1..8, got {bits}")
    return (images.astype(np.uint8) >> (8 - bits)).astype(np.uint8)


def binarize_threshold(images: np.ndarray, threshold: int = 128) -> np.ndarray:
    return (images >= threshold).astype(np.uint8)


def binarize_stochastic(images: np.ndarray, seed: int) -> np.ndarray:
    """Each pixel is 1 with probability value / 255 (the usual stochastic binarization)."""
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape) < images / 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------- sources

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def shared_data_dir(name: str, data_dir: str | Path | None, env: str, beside_checkout: Path) -> Path:
    """A data set's folder: `data_dir` (--data-dir), else $env, else `beside_checkout` under the
    checkout that is the current directory or that holds this source file. DataError naming
    every place looked at when none exists."""
    given = data_dir or os.environ.get(env)
    if given:
        return Path(given)
    roots = [Path.cwd()] + ([SOURCE_ROOT] if (SOURCE_ROOT / "pyproject.toml").is_file() else [])
    looked = []
    for root in roots:
        folder = (root / beside_checkout).resolve()
        if folder.is_dir():
            return folder
        if folder not in looked:
            looked.append(folder)
    raise DataError(f"{name}: no data folder given and none found (looked for {', '.join(map(str, looked))}); "
                    f"pass --data-dir or set ${env}")


def binarized_mnist_dir(data_dir: str | Path | None = None) -> Path:
    """The folder of binarized MNIST's .npz files (shared_data_dir)."""
    return shared_data_dir("binarized-mnist", data_dir, BINARIZED_MNIST_ENV, CHECKOUT_BINARIZED_MNIST)


def _binarized_mnist(spec: DataSpec, split: str) -> ImageSet:
    root = binarized_mnist_dir(spec.data_dir)
    images = read_npz_images(root / f"{split}.npz")
    if images.max(initial=0) > 1:
        raise DataError(f"{root / (split + '.npz')}: binarized MNIST must hold 0/1 values, found {int(images.max())}")
    return ImageSet(images[:, None].astype(np.uint8), None, 2, 0, f"binarized-mnist/{split}")


def _fashion_mnist_raw(spec: DataSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(spec.data_dir) if spec.data_dir else FASHION_MNIST_DIR
    if not root.is_dir():
        raise DataError(f"{root}: Fashion-MNIST directory not found (install Debian's dataset-fashion-mnist, or run make setup)")
    prefix = "t10k" if split == "test" else "train"

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz", f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (root / name).exists():
                return root / name
        return root / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"

    images, labels = read_idx(find("images")), read_idx(find("labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    if split != "test":
        cut = len(images) - 10_000
        images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
    return images, labels.astype(np.int64)


def _fashion_mnist(spec: DataSpec, split: str) -> ImageSet:
    images, labels = _fashion_mnist_raw(spec, split)
    return ImageSet(quantize(images, spec.bits)[:, None], labels, 2**spec.bits, 10, f"fashion-mnist/{split} ({spec.bits} bits)")


def _mnist(spec: DataSpec, split: str) -> ImageSet:
    if split != "test":
        raise DataError(f"mnist: only the test split is available (an out-of-distribution set), not {split!r}")
    root = shared_data_dir("mnist", spec.data_dir, MNIST_ENV, CHECKOUT_MNIST)
    images, labels = read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx(root / "t10k-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: test images {images.shape} and labels {labels.shape} do not match")
    return ImageSet(quantize(images, spec.bits)[:, None], labels.astype(np.int64), 2**spec.bits, 10, f"mnist/{split} ({spec.bits} bits)")


def _fashion_mnist_binary(spec: DataSpec, split: str) -> ImageSet:
    images, labels = _fashion_mnist_raw(spec, split)
    if spec.binarize == "threshold":
        binary = binarize_threshold(images)
    elif spec.binarize == "stochastic":
        binary = binarize_stochastic(images, spec.seed + SPLITS.index(split))
    else:
        raise DataError(f"binarize must be 'threshold' or 'stochastic', got {spec.binarize!r}")
    return ImageSet(binary[:, None], labels, 2, 10, f"fashion-mnist-binary/{split} ({spec.binarize})")


# Photographs shipped inside scikit-image; the split is by photograph so no patch leaks.
RGB_PHOTOS = {
    "train": ["astronaut", "chelsea", "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel"],
    "valid": ["coffee"],
    "test": ["rocket"],
}


def _rgb_patches(spec: DataSpec, split: str) -> ImageSet:
    import skimage.data

    count = spec.count or {"train": 20_000, "valid": 2_000, "test": 2_000}[split]
    rng = np.random.default_rng(spec.seed * 3 + SPLITS.index(split))
    photos = []
    for name in RGB_PHOTOS[split]:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= spec.size:
            photos.append(img[:, :, :3].astype(np.uint8))
    if not photos:
        raise DataError(f"rgb-patches: no photograph of at least {spec.size}x{spec.size} for split {split}")
    s = spec.size
    out = np.empty((count, 3, s, s), dtype=np.uint8)
    which = rng.integers(0, len(photos), count)
    for n, k in enumerate(which):
        img = photos[k]
        y, x = rng.integers(0, img.shape[0] - s + 1), rng.integers(0, img.shape[1] - s + 1)
        out[n] = img[y:y + s, x:x + s].transpose(2, 0, 1)
    return ImageSet(quantize(out, spec.bits), None, 2**spec.bits, 0, f"rgb-patches/{split} ({s}x{s}, {spec.bits} bits)")


def _synthetic(spec: DataSpec, split: str) -> ImageSet:
    """Horizontal bars (label 0), vertical bars (1) and filled boxes (2) on a dark background."""
    count = spec.count or 512
    s, c, levels = spec.size, spec.channels, 2**spec.bits
    rng = np.random.default_rng(10_000 * spec.seed + SPLITS.index(split))
    images = np.zeros((count, c, s, s), dtype=np.uint8)
    labels = rng.integers(0, 3, count)
    for n, label in enumerate(labels):
        a, b = sorted(rng.integers(0, s, 2))
        colour = rng.integers(levels // 2, levels, c)
        region = (slice(a, b + 1), slice(None)) if label == 0 else (slice(None), slice(a, b + 1)) if label == 1 else (slice(a, b + 1), slice(a, b + 1))
        images[n][(slice(None),) + region] = colour[:, None, None]
    return ImageSet(images, labels.astype(np.int64), levels, 3, f"synthetic/{split} ({c}x{s}x{s})")


SOURCES = {
    "binarized-mnist": _binarized_mnist,
    "fashion-mnist": _fashion_mnist,
    "fashion-mnist-binary": _fashion_mnist_binary,
    "mnist": _mnist,
    "rgb-patches": _rgb_patches,
    "synthetic": _synthetic,
}


def load(spec: DataSpec | dict | str, split: str) -> ImageSet:
    """Load split `split` of the data set described by `spec` (a DataSpec, its dict, or a name)."""
    if isinstance(spec, str):
        spec = DataSpec(name=spec)
    elif isinstance(spec, dict):
        spec = DataSpec(**spec)
    if spec.name not in SOURCES:
        raise DataError(f"unknown data set {spec.name!r}; known: {', '.join(SOURCES)}")
    if not 1 <= spec.bits <= 8:
        raise DataError(f"bits must be in 1..8, got {spec.bits}")
    _check_split(split)
    loaded = SOURCES[spec.name](spec, split)
    return loaded if spec.classes is None else only_classes(loaded, spec.classes, spec.name)


def only_classes(loaded: ImageSet, classes, name: str) -> ImageSet:
    if loaded.labels is None:
        raise DataError(f"classes={classes!r}: {name} has no class labels")
    wanted = sorted({int(c) for c in (classes if isinstance(classes, (list, tuple)) else [classes])})
    bad = [c for c in wanted if not 0 <= c < loaded.num_classes]
    if not wanted or bad:
        raise DataError(f"classes={classes!r}: {name} has classes 0..{loaded.num_classes - 1}")
    keep = np.isin(loaded.labels, wanted)
    return ImageSet(loaded.images[keep], loaded.labels[keep], loaded.levels, loaded.num_classes,
                    f"{loaded.description}, classes {', '.join(map(str, wanted))}")
