import gzip
import subprocess
import sys

import numpy as np
import pytest

from pixelrnn.runtime import datasets as data
from pixelrnn.runtime.datasets import DataError, DataSpec


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.idx", arr, compress)
    assert np.array_equal(data.read_idx(tmp_path / "x.idx"), arr)


def test_idx_errors_name_the_file_and_the_problem(tmp_path):
    arr = np.zeros((4, 5, 5), dtype=np.uint8)
    f = tmp_path / "images-idx3-ubyte"
    write_idx(f, arr)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"images-idx3-ubyte: truncated: header says \(4, 5, 5\) = 100 bytes of data, found 93"):
        data.read_idx(f)
    f.write_bytes(b"\x12\x34\x08\x03" + bytes(16))
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(f)
    g = tmp_path / "labels.gz"
    blob = gzip.compress(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    g.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="labels.gz: corrupt or truncated gzip"):
        data.read_idx(g)
    with pytest.raises(DataError, match="nope.idx: file not found"):
        data.read_idx(tmp_path / "nope.idx")


def test_binarized_mnist_reader_and_its_errors(tmp_path):
    images = (np.random.default_rng(0).random((6, 28, 28)) > 0.5).astype(np.uint8)
    np.savez(tmp_path / "train.npz", images=images)
    s = data.load(DataSpec("binarized-mnist", data_dir=str(tmp_path)), "train")
    assert s.images.shape == (6, 1, 28, 28) and s.levels == 2 and np.array_equal(s.images[:, 0], images)
    with pytest.raises(DataError, match="valid.npz: file not found"):
        data.load(DataSpec("binarized-mnist", data_dir=str(tmp_path)), "valid")
    np.savez(tmp_path / "valid.npz", pixels=images)
    with pytest.raises(DataError, match="no array named 'images'"):
        data.load(DataSpec("binarized-mnist", data_dir=str(tmp_path)), "valid")
    (tmp_path / "test.npz").write_bytes((tmp_path / "train.npz").read_bytes()[:200])
    with pytest.raises(DataError, match="test.npz: unreadable or corrupt"):
        data.load(DataSpec("binarized-mnist", data_dir=str(tmp_path)), "test")
    np.savez(tmp_path / "valid.npz", images=images * 3)
    with pytest.raises(DataError, match="0/1 values"):
        data.load(DataSpec("binarized-mnist", data_dir=str(tmp_path)), "valid")


def test_binarized_mnist_folder_is_the_flag_then_the_variable_then_a_checkouts(tmp_path, monkeypatch):
    checkout, elsewhere = tmp_path / "work" / "main", tmp_path / "elsewhere"
    shared = tmp_path / "work" / "shared" / "data" / "binarized_mnist"
    for folder in (checkout, elsewhere, shared):
        folder.mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    installed = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "pixelrnn"  # no pyproject.toml
    monkeypatch.delenv(data.BINARIZED_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "SOURCE_ROOT", installed)
    monkeypatch.chdir(checkout)
    assert data.binarized_mnist_dir() == shared.resolve()  # the current directory is a checkout
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(data, "SOURCE_ROOT", checkout)
    assert data.binarized_mnist_dir() == shared.resolve()  # the source is a checkout
    monkeypatch.setenv(data.BINARIZED_MNIST_ENV, str(elsewhere))
    assert data.binarized_mnist_dir() == elsewhere
    assert data.binarized_mnist_dir(str(tmp_path)) == tmp_path  # --data-dir first


def test_binarized_mnist_found_nowhere_is_one_line_naming_the_places_and_the_remedy(tmp_path, monkeypatch):
    """An installed client outside a checkout: the source sits in site-packages, whose
    ../shared is nothing of the project's and is not looked at."""
    installed = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "pixelrnn"
    (installed.parent / "shared" / "data" / "binarized_mnist").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.delenv(data.BINARIZED_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "SOURCE_ROOT", installed)
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(DataError) as caught:
        data.load("binarized-mnist", "valid")
    message = str(caught.value)
    assert "\n" not in message and "site-packages" not in message
    assert str(tmp_path / "shared" / "data" / "binarized_mnist") in message  # ../shared beside the current directory
    assert message.endswith("pass --data-dir or set $BINARIZED_MNIST_DIR")


def test_the_data_and_image_modules_need_numpy_alone_until_a_function_needs_more(tmp_path):
    """runtime/ must import in a deployed repository's environment (numpy + onnxruntime): torch,
    pillow and scikit-image are imported only by the functions that use them."""
    script = """
import sys
for name in ("torch", "PIL", "skimage"):
    sys.modules[name] = None  # importing it now raises ImportError
import argparse
import numpy as np
from pixelrnn.runtime import data_flags, datasets, images
parser = argparse.ArgumentParser()
data_flags.add_data_arguments(parser)
args = parser.parse_args(["--data", "synthetic", "--data-arg", "count=4", "--data-arg", "size=6"])
s = datasets.load(data_flags.data_spec_from_args(args), "train")
np.save(sys.argv[1], s.images)
assert np.array_equal(images.load_images(sys.argv[1], levels=s.levels), s.images)
assert images.grid_array(s.images, s.levels, nrow=2).shape == (2 + 2 * 8, 2 + 2 * 8, 1)
loaded = {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
assert not loaded & {"torch", "PIL", "skimage"}, loaded
assert not [m for m in sys.modules if m.startswith("pixelrnn.training")]
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shared_binarized_mnist_is_the_standard_split():
    train = data.load("binarized-mnist", "train")
    valid = data.load("binarized-mnist", "valid")
    assert train.images.shape == (50000, 1, 28, 28) and valid.images.shape == (10000, 1, 28, 28)
    assert set(np.unique(valid.images)) == {0, 1}


def test_fashion_mnist_from_the_debian_package():
    train, valid, test = (data.load("fashion-mnist", s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (50000, 10000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.levels == 256 and train.num_classes == 10
    assert set(np.unique(test.labels)) == set(range(10))
    four = data.load(DataSpec("fashion-mnist", bits=4), "valid")
    assert four.levels == 16 and np.array_equal(four.images, valid.images >> 4)
    binary = data.load("fashion-mnist-binary", "valid")
    assert binary.levels == 2 and np.array_equal(binary.images, (valid.images >= 128).astype(np.uint8))


def test_a_subset_of_classes_keeps_their_images_and_labels_and_refuses_what_cannot_be():
    valid = data.load("fashion-mnist", "valid")
    part = data.load(DataSpec("fashion-mnist", classes=[4, 0, 2]), "valid")
    keep = np.isin(valid.labels, [0, 2, 4])
    assert np.array_equal(part.images, valid.images[keep]) and np.array_equal(part.labels, valid.labels[keep])
    assert part.num_classes == 10 and "classes 0, 2, 4" in part.description  # labels keep their meaning
    with pytest.raises(DataError, match="binarized-mnist has no class labels"):
        data.load(DataSpec("binarized-mnist", classes=[0]), "valid")
    with pytest.raises(DataError, match=r"fashion-mnist has classes 0\.\.9"):
        data.load(DataSpec("fashion-mnist", classes=[3, 10]), "valid")
    with pytest.raises(DataError, match=r"fashion-mnist has classes 0\.\.9"):
        data.load(DataSpec("fashion-mnist", classes=[]), "valid")


def test_fashion_mnist_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: file not found"):
        data.load(DataSpec("fashion-mnist", data_dir=str(tmp_path)), "train")
    with pytest.raises(DataError, match="directory not found"):
        data.load(DataSpec("fashion-mnist", data_dir=str(tmp_path / "absent")), "train")


def test_quantize_and_binarize():
    x = np.array([0, 15, 16, 127, 128, 255], dtype=np.uint8)
    assert data.quantize(x, 4).tolist() == [0, 0, 1, 7, 8, 15]
    assert data.quantize(x, 8).tolist() == x.tolist()
    assert data.binarize_threshold(x).tolist() == [0, 0, 0, 0, 1, 1]
    grey = np.full(20000, 64, dtype=np.uint8)
    assert abs(data.binarize_stochastic(grey, seed=0).mean() - 64 / 255) < 0.01
    with pytest.raises(DataError, match="bits"):
        data.quantize(x, 9)


def test_rgb_patches_come_from_separate_photographs():
    train = data.load(DataSpec("rgb-patches", count=64), "train")
    valid = data.load(DataSpec("rgb-patches", count=64), "valid")
    assert train.images.shape == (64, 3, 32, 32) and train.levels == 256 and train.labels is None
    assert set(data.RGB_PHOTOS["train"]).isdisjoint(data.RGB_PHOTOS["valid"] + data.RGB_PHOTOS["test"])
    again = data.load(DataSpec("rgb-patches", count=64), "train")
    assert np.array_equal(train.images, again.images)  # deterministic given the seed
    assert train.images.std() > 10  # real photographs, not blank patches
    assert not np.array_equal(train.images[:8], valid.images[:8])


def test_synthetic_is_small_deterministic_and_in_range():
    spec = DataSpec("synthetic", size=8, channels=3, bits=2, count=32)
    a, b = data.load(spec, "train"), data.load(spec, "train")
    assert a.images.shape == (32, 3, 8, 8) and a.levels == 4 and a.images.max() <= 3
    assert np.array_equal(a.images, b.images) and a.labels is not None and a.num_classes == 3


def test_unknown_names_are_refused():
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        data.load("cifar", "train")
    with pytest.raises(DataError, match="unknown split"):
        data.load("synthetic", "dev")


def test_mnist_is_the_grey_test_split_only(tmp_path, monkeypatch):
    """`mnist`: the grey digits, an out-of-distribution set, read from IDX files in --data-dir."""
    from pixelrnn.runtime.datasets import load

    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 2, 1])))
    s = load({"name": "mnist", "data_dir": str(tmp_path)}, "test")
    assert s.images.shape == (3, 1, 28, 28) and s.levels == 256 and s.labels.tolist() == [7, 2, 1]
    assert np.array_equal(s.images[:, 0], images)
    assert load({"name": "mnist", "data_dir": str(tmp_path), "bits": 1}, "test").images.max() == 1
    with pytest.raises(DataError, match="only the test split"):
        load({"name": "mnist", "data_dir": str(tmp_path)}, "valid")
    monkeypatch.delenv("MNIST_DIR", raising=False)  # no checkout around: one line naming where it looked
    monkeypatch.setattr(data, "SOURCE_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"mnist: no data folder given and none found .*pass --data-dir or set \$MNIST_DIR"):
        load("mnist", "test")
