import gzip

import numpy as np
import pytest

from pixelrnn.training import data
from pixelrnn.training.data import DataError, DataSpec


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
