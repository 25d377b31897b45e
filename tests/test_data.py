"""Tests for dynsim.data: file formats on tiny files written here, digits, array checks."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from dynsim.data import (
    DATASETS,
    FASHION_MNIST_DEFAULT_DIR,
    Dataset,
    center_per_image,
    check_images,
    load_cifar,
    load_dataset,
    load_digits,
    load_idx_dataset,
    load_stl10,
    read_idx,
    write_idx,
)
from dynsim.errors import ConfigError, DataError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _bytes_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 28, 28)])
def test_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    array = _bytes_images(1, shape, seed=1)[0]
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[0] = 0  # the result is an ordinary writable array


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([[1, -2, 70000], [0, 5, -(2**31)]])
    header = bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes()
    path = tmp_path / "ints-idx"
    path.write_bytes(header + values.astype(">i4").tobytes())
    back = read_idx(path)
    assert back.dtype == np.int32 and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def _corrupt(kind: str, good: bytes) -> bytes:
    return {
        "truncated": good[:-10],
        "too long": good + b"\0",
        "bad magic": b"\x12\x34" + good[2:],
        "bad dtype code": good[:2] + b"\x07" + good[3:],
        "header only part": good[:6],
        "empty": b"",
        "truncated gzip": gzip.compress(good)[:-20],
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "too long", "bad magic", "bad dtype code",
                                  "header only part", "empty", "truncated gzip"])
def test_read_idx_corrupt_file_names_path(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good-idx"
    write_idx(good, _bytes_images(4, (28, 28), seed=2))
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(_corrupt(kind, good.read_bytes()))
    with pytest.raises(DataError, match=str(bad)):
        read_idx(bad)


def test_read_idx_messages_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "x-idx"
    write_idx(path, np.zeros((5, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"size mismatch.*\(5, 4\)"):
        read_idx(path)
    path.write_bytes(b"\x00\x01\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="bad magic number 00010801"):
        read_idx(path)
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "absent")


@pytest.mark.parametrize("array", [np.array([0, 256]), np.array([-1, 3]), np.array([0.5]),
                                   np.array(3)])
def test_write_idx_rejects_non_bytes(tmp_path: Path, array: np.ndarray) -> None:
    with pytest.raises(DataError, match="write_idx"):
        write_idx(tmp_path / "x-idx", array)


# ----------------------------------------------------------------------------- MNIST / Fashion


def _write_idx_set(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": _bytes_images(n_train, (28, 28), seed=3),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": _bytes_images(n_test, (28, 28), seed=4),
        "y_test": np.array([9, 0, 4][:n_test], dtype=np.uint8),
    }
    for (i, base), array in zip(enumerate(IDX_NAMES), arrays.values(), strict=True):
        write_idx(folder / (base + (".gz" if gz and i % 2 == 0 else "")), array)  # mixed raw/gz
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_dataset_tiny(tmp_path: Path, name: str) -> None:
    arrays = _write_idx_set(tmp_path)
    data = load_idx_dataset(name, tmp_path)
    assert data.name == name and data.image_shape == (1, 28, 28) and data.n_classes == 10
    assert data.x_train.shape == (5, 784) and data.x_test.shape == (3, 784)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.y_train, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(data.y_test, [9, 0, 4])
    # row-major flattening and /255 scaling: pixel (row 3, column 17) of image 2
    assert data.x_train[2, 3 * 28 + 17] == np.float32(arrays["x_train"][2, 3, 17]) / 255
    np.testing.assert_allclose(data.x_test, arrays["x_test"].reshape(3, -1) / 255, rtol=1e-6)
    assert load_dataset(name, str(tmp_path)).x_train.shape == (5, 784)


def test_load_idx_dataset_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES[3], np.array([1, 2], np.uint8))
    with pytest.raises(DataError, match=f"{tmp_path / IDX_NAMES[3]}.*expected 3 labels"):
        load_idx_dataset("mnist", tmp_path)


def test_load_idx_dataset_label_out_of_range(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES[1], np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(DataError, match=f"{tmp_path / IDX_NAMES[1]}.*0..9"):
        load_idx_dataset("fashion-mnist", tmp_path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_idx_dataset("fashion-mnist", folder)
    assert str(err.value) == (
        f"Fashion-MNIST not found at {folder} (missing train-images-idx3-ubyte[.gz]). Install "
        "it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR with the four "
        "IDX files.")


def test_missing_mnist_file_named(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"MNIST not found at .*missing t10k-images-idx3-ubyte"
                                        r"\[\.gz\]\).*cannot download MNIST.*--data-dir"):
        load_idx_dataset("mnist", tmp_path)


def test_mnist_has_no_default_dir() -> None:
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("mnist")


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar(folder: Path, files: dict[str, np.ndarray], key: bytes, labels: dict,
                 protocol: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file, images in files.items():
        batch = {b"batch_label": file.encode(), b"data": images, key: labels[file]}
        (folder / file).write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("nested", [False, True])
def test_load_cifar10_channel_major(tmp_path: Path, protocol: int, nested: bool) -> None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = {f: np.zeros((4, 3072), np.uint8) for f in names}
    files["data_batch_3"][1, 2 * 1024 + 5 * 32 + 7] = 200  # blue channel, row 5, column 7
    files["test_batch"][3, 0 * 1024 + 31 * 32 + 0] = 51  # red channel, row 31, column 0
    labels = {f: [(i + j) % 10 for j in range(4)] for i, f in enumerate(names)}
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    _write_cifar(folder, files, b"labels", labels, protocol)
    data = load_cifar("cifar10", tmp_path)
    assert data.x_train.shape == (20, 3072) and data.x_test.shape == (4, 3072)
    assert data.image_shape == (3, 32, 32) and data.n_classes == 10
    images = data.x_train.reshape(-1, *data.image_shape)
    assert images[2 * 4 + 1, 2, 5, 7] == np.float32(200) / 255
    assert images.sum() == np.float32(200) / 255  # nothing else lit up
    assert data.x_test.reshape(-1, 3, 32, 32)[3, 0, 31, 0] == np.float32(51) / 255
    np.testing.assert_array_equal(data.y_train, sum((labels[f] for f in names[:5]), []))
    assert data.y_train.dtype == np.int64


def test_load_cifar100_fine_labels(tmp_path: Path) -> None:
    files = {"train": _bytes_images(4, (3072,), seed=5), "test": _bytes_images(2, (3072,), 6)}
    labels = {"train": [0, 99, 42, 7], "test": [98, 1]}
    _write_cifar(tmp_path / "cifar-100-python", files, b"fine_labels", labels, protocol=2)
    data = load_dataset("cifar100", tmp_path)
    assert data.n_classes == 100 and data.x_train.shape == (4, 3072)
    np.testing.assert_array_equal(data.y_train, [0, 99, 42, 7])
    np.testing.assert_array_equal(data.x_test * 255, files["test"])
    assert data.x_train.reshape(-1, 3, 32, 32)[1, 1, 2, 3] == \
        np.float32(files["train"][1, 1024 + 2 * 32 + 3]) / 255


def test_missing_cifar_names_the_pickles(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found at .*missing data_batch_1.*"
                                        r"python version.*cifar-10-python\.tar\.gz.*test_batch"):
        load_cifar("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"CIFAR-100 not found.*missing train.*python version"):
        load_cifar("cifar100", tmp_path)


def _cifar100_with(tmp_path: Path, test_content: bytes) -> Path:
    files = {"train": np.zeros((2, 3072), np.uint8)}
    _write_cifar(tmp_path, files, b"fine_labels", {"train": [1, 2]}, protocol=5)
    (tmp_path / "test").write_bytes(test_content)
    return tmp_path / "test"


class _Evil:
    def __reduce__(self):  # a pickle that would run a command when loaded
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("content, message", [
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-30], "not a CIFAR python pickle"),
    (b"garbage", "not a CIFAR python pickle"),
    (pickle.dumps([1, 2]), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1]}),
     "1 labels for 2 images"),
    (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [1, 2]}),
     r"uint8 \(n, 3072\)"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}), "0..99"),
    (pickle.dumps(_Evil()), "refusing to load global"),
], ids=["truncated", "garbage", "not a dict", "label count", "row length", "label range", "evil"])
def test_corrupt_cifar_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  content: bytes, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = _cifar100_with(tmp_path, content)
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        load_cifar("cifar100", tmp_path)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- STL-10


def _write_stl(folder: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        # the binary release stores each channel column-major: swap H and W before writing
        (folder / f"{split}_X.bin").write_bytes(images[split].transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels[split].astype(np.uint8).tobytes())


@pytest.mark.parametrize("nested", [False, True])
def test_load_stl10_column_major(tmp_path: Path, nested: bool) -> None:
    images = {"train": np.zeros((2, 3, 96, 96), np.uint8), "test": _bytes_images(3, (3, 96, 96), 7)}
    images["train"][1, 0, 1, 50] = 255  # red, row 1, column 50
    labels = {"train": np.array([1, 10]), "test": np.array([3, 2, 1])}
    _write_stl(tmp_path / "stl10_binary" if nested else tmp_path, images, labels)
    data = load_dataset("stl10", tmp_path)
    assert data.image_shape == (3, 96, 96) and data.n_features == 27648
    assert data.x_train.shape == (2, 27648) and data.x_test.shape == (3, 27648)
    train = data.x_train.reshape(-1, 3, 96, 96)
    assert train[1, 0, 1, 50] == 1.0 and train.sum() == 1.0
    np.testing.assert_array_equal(data.x_test.reshape(-1, 3, 96, 96) * 255, images["test"])
    np.testing.assert_array_equal(data.y_train, [0, 9])
    np.testing.assert_array_equal(data.y_test, [2, 1, 0])


def test_stl10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"STL-10 not found .*missing train_X\.bin.*stl10_binary"):
        load_stl10(tmp_path)
    images = {s: np.zeros((2, 3, 96, 96), np.uint8) for s in ("train", "test")}
    _write_stl(tmp_path, images, {"train": np.array([1, 2]), "test": np.array([1])})
    with pytest.raises(DataError, match=f"{tmp_path / 'test_y.bin'}: 1 labels for 2 images"):
        load_stl10(tmp_path)
    (tmp_path / "train_X.bin").write_bytes(bytes(27648 + 5))
    with pytest.raises(DataError, match=f"{tmp_path / 'train_X.bin'}.*truncated"):
        load_stl10(tmp_path)


# ----------------------------------------------------------------------------- digits, subsets


def test_load_digits() -> None:
    data = load_digits()
    assert data.x_train.shape == (1348, 64) and data.x_test.shape == (449, 64)
    assert data.image_shape == (1, 8, 8) and data.n_features == 64 and data.n_classes == 10
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    # train + test are the 1797 digits, each once, and every class has its share of test
    from sklearn.datasets import load_digits as sklearn_digits

    everything = (sklearn_digits().data / 16).astype(np.float32)
    together = np.concatenate([data.x_train, data.x_test])
    assert sorted(map(bytes, together)) == sorted(map(bytes, everything))
    all_labels = np.concatenate([data.y_train, data.y_test])
    assert np.abs(np.bincount(data.y_test) - 0.25 * np.bincount(all_labels)).max() <= 1
    again, other = load_digits(), load_digits(seed=1)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    assert not np.array_equal(other.x_test, data.x_test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_load_digits_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits(test_fraction=fraction)


def test_subset_is_stratified_and_deterministic() -> None:
    data = load_digits()
    small = data.subset(n_train=100, n_test=30, seed=3)
    assert small.x_train.shape == (100, 64) and small.y_test.shape == (30,)
    assert set(np.bincount(small.y_train, minlength=10)) <= {9, 10, 11}
    assert set(np.bincount(small.y_test, minlength=10)) == {3}
    same = data.subset(n_train=100, n_test=30, seed=3)
    np.testing.assert_array_equal(same.x_train, small.x_train)
    assert not np.array_equal(data.subset(100, seed=4).x_train, small.x_train)
    # every chosen row is a row of the original split, with its own label
    lookup = {r.tobytes(): y for r, y in zip(data.x_train, data.y_train, strict=True)}
    assert all(lookup[r.tobytes()] == y for r, y in zip(small.x_train, small.y_train, strict=True))
    np.testing.assert_array_equal(data.subset().x_test, data.x_test)
    with pytest.raises(ConfigError, match="n_train=2000"):
        data.subset(n_train=2000)


def test_dataset_rejects_mismatched_arrays() -> None:
    x = np.zeros((3, 64), np.float32)
    with pytest.raises(DataError, match="x_test"):
        Dataset("digits", x, np.zeros(3, np.int64), x[:, :10], np.zeros(3, np.int64), (1, 8, 8), 10)


# ----------------------------------------------------------------------------- arrays


def test_center_per_image_rows_have_zero_mean() -> None:
    x = np.random.default_rng(8).random((6, 784)).astype(np.float32)
    centred = center_per_image(x)
    assert centred.dtype == np.float32 and centred.shape == x.shape
    np.testing.assert_allclose(centred.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(centred, x - x.mean(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(center_per_image([[0, 1], [2, 6]]), [[-0.5, 0.5], [-2, 2]])


def test_check_images_names_first_bad_sample() -> None:
    x = np.zeros((50, 4))
    x[40, 1] = np.nan
    x[17, 3] = np.nan
    with pytest.raises(DataError, match=r"^x\[17\] contains NaN$"):
        check_images(x)
    x[5, 0] = -np.inf
    with pytest.raises(DataError, match=r"^inputs\[5\] contains -inf"):
        check_images(x, name="inputs")
    with pytest.raises(DataError, match=r"x\[0\] contains inf.*too large for float32"):
        check_images(np.array([[1e39]]))


def test_check_images_shape_and_type() -> None:
    with pytest.raises(DataError, match=r"has 783 features per sample, expected 784"):
        check_images(np.zeros((2, 783)), 784)
    with pytest.raises(DataError, match=r"got shape \(784,\).*reshape\(1, -1\)"):
        check_images(np.zeros(784), 784)
    with pytest.raises(DataError, match=r"2-D.*\(2, 28, 28\)"):
        check_images(np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="numeric"):
        check_images(np.array([["a", "b"]]))
    out = check_images(np.array([[0, 255]], dtype=np.uint8), 2)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 255.0]]


# ----------------------------------------------------------------------------- dispatcher


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_datasets_without_default_need_data_dir(name: str) -> None:
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset(name)


def test_load_dataset_digits() -> None:
    assert load_dataset("digits").x_train.shape == (1348, 64)
    with pytest.raises(ConfigError, match="no --data-dir"):
        load_dataset("digits", "/tmp")


@pytest.mark.realdata
def test_real_fashion_mnist() -> None:
    if not (FASHION_MNIST_DEFAULT_DIR / "train-images-idx3-ubyte.gz").exists() and not (
            FASHION_MNIST_DEFAULT_DIR / "train-images-idx3-ubyte").exists():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DEFAULT_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    assert data.n_classes == 10 and set(np.unique(data.y_train)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(data.y_test), [1000] * 10)
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
