"""Image data sets as flat float32 arrays, read from local files only.

Every loader returns a :class:`Dataset` whose images are rows of shape ``(C*H*W,)`` in
torch order (channel, row, column), scaled from bytes to ``[0, 1]`` by ``/255`` (digits:
``/16``). Nothing is downloaded and nothing is cached on disk: scikit-learn's digits are
bundled with scikit-learn, Fashion-MNIST comes from the Debian package
``dataset-fashion-mnist``, and MNIST, CIFAR and STL-10 are read from a directory the user
names with ``--data-dir``.

Example
-------
>>> from dynsim.data import load_digits, center_per_image
>>> data = load_digits()
>>> data.x_train.shape, data.image_shape
((1348, 64), (1, 8, 8))
>>> x = center_per_image(data.x_train)       # DSSM input: /16 already, minus own mean
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynsim.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "stl10")
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {  # (C, H, W) of each data set, known before loading
    "digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "stl10": (3, 96, 96),
}

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CIFAR = {  # name: (title, subdirectory, train files, test file, label key, classes, archive)
    "cifar10": ("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", b"labels", 10, "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100", "cifar-100-python", ("train",), "test", b"fine_labels", 100,
                 "cifar-100-python.tar.gz"),
}
_STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
_STL_SHAPE = (3, 96, 96)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set with a fixed train/test split.

    Attributes
    ----------
    name : str
        One of :data:`DATASETS`.
    x_train, x_test : np.ndarray, shape (n_train, n_features) / (n_test, n_features)
        float32 in [0, 1]; each row is one image flattened in (C, H, W) order.
    y_train, y_test : np.ndarray, shape (n_train,) / (n_test,)
        int64 class labels in ``0 .. n_classes-1``.
    image_shape : tuple of int
        ``(C, H, W)``; ``x.reshape(-1, *image_shape)`` gives torch-layout images.
    n_classes : int
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, int, int]
    n_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or x.shape[1] != self.n_features or y.shape != (len(x),):
                raise DataError(f"{self.name}: x_{split} {x.shape} and y_{split} {y.shape} do "
                                f"not match image shape {self.image_shape}")

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n_train={len(self.x_train)}, "
                f"n_test={len(self.x_test)}, image_shape={self.image_shape}, "
                f"n_classes={self.n_classes})")

    @property
    def n_features(self) -> int:
        """Pixels per image, ``C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0) -> Dataset:
        """Return a smaller data set drawn without replacement, stratified by class.

        Each class keeps its share of the split (largest-remainder rounding); within a class
        the images are chosen by ``np.random.default_rng(seed)``, and the chosen rows keep
        their original order. The same seed always gives the same subset. ``None`` keeps
        the whole split.
        """
        train = _stratified_indices(self.y_train, n_train, seed, "n_train")
        test = _stratified_indices(self.y_test, n_test, seed, "n_test")
        return dataclasses.replace(self, x_train=self.x_train[train], y_train=self.y_train[train],
                                   x_test=self.x_test[test], y_test=self.y_test[test])


def _stratified_indices(y: np.ndarray, n: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted indices of ``n`` rows of ``y`` (n_total,) with class shares kept."""
    if n is None:
        return np.arange(len(y))
    if not 0 < n <= len(y):
        raise ConfigError(f"{what}={n} is out of range; choose 1 .. {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    take, remainder = np.divmod(counts * n, len(y))
    take[np.argsort(-remainder, kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False)
              for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, bundled), values ``0..16`` divided by 16.

    The test split holds ``round(test_fraction * 1797)`` images, stratified by class and
    chosen with ``seed`` (see :meth:`Dataset.subset`); train is the rest. Both keep the
    original order.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # slow import: only when used

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    test = _stratified_indices(y, max(1, round(test_fraction * len(y))), seed, "n_test")
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset("digits", x[train], y[train], x[test], y[test], (1, 8, 8), 10)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed: detected from the content).

    Returns the array with the shape and dtype in the header, in native byte order.
    Raises :class:`DataError` naming ``path`` if the file is unreadable, not IDX, or its
    size does not match its header.
    """
    path = Path(path)
    raw = _read_idx_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; "
                        "expected 0000 + dtype code + number of dimensions)")
    ndim, dtype = raw[3], _IDX_DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: size mismatch: header says shape {shape} of {dtype.name} "
                        f"({expected} bytes), file has {len(raw)} bytes (truncated or corrupt)")
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable native-order copy


MAX_INFLATED_BYTES = 8 << 30  # no data set dynsim reads inflates to more than 8 GiB


def _read_idx_bytes(path: Path, *, limit: int | None = None) -> bytes:
    """An IDX file's bytes; a gzip file is inflated only as far as its header says it should
    go (plus one byte, to notice more), so a small file that would inflate to gigabytes is
    refused after reading its header, not after filling the memory."""
    try:
        with path.open("rb") as fh:
            compressed = fh.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if compressed[:2] != b"\x1f\x8b":
        return compressed
    limit = MAX_INFLATED_BYTES if limit is None else limit
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        head = inflater.decompress(compressed, 4)
        expected = limit
        if len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and head[3]:
            dims = inflater.decompress(inflater.unconsumed_tail, 4 * head[3])
            head += dims
            if len(dims) == 4 * head[3]:
                shape = np.frombuffer(dims, ">u4")
                expected = 4 + 4 * head[3] + math.prod(int(d) for d in shape) * _IDX_DTYPES[head[2]].itemsize
        if expected > limit:
            raise DataError(f"{path}: its header claims {expected} bytes of data, more than the "
                            f"{limit}-byte limit; the file is corrupt or not a data set")
        body = inflater.decompress(inflater.unconsumed_tail, expected - len(head) + 1)
    except (zlib.error, EOFError) as err:
        raise DataError(f"{path}: cannot read: corrupt gzip data ({err})") from err
    raw = head + body
    if len(raw) > expected:
        raise DataError(f"{path}: decompresses to more than the {expected} bytes its header says "
                        "(a corrupt file, or a decompression bomb); refused without inflating the rest")
    return raw


def _read_bytes(path: Path, *, gunzip: bool) -> bytes:
    """Whole file content; with ``gunzip``, decompressed if it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if gunzip and raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read: {err}") from err


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (any shape, integers in 0..255) as a uint8 IDX file.

    The file is gzip-compressed when ``path`` ends with ``.gz``.
    """
    array = np.asarray(array)
    fits = array.dtype.kind in "biu" and 1 <= array.ndim <= 255
    if not fits or (array.size and not 0 <= array.min() <= array.max() <= 255):
        raise DataError(f"write_idx stores uint8: needs integers in 0..255 with 1..255 "
                        f"dimensions, got {array.dtype} shape {array.shape}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    content = header + array.astype(np.uint8).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(content, mtime=0) if path.suffix == ".gz" else content)


def load_idx_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files in ``data_dir``, each raw or ``.gz``.

    ``data_dir`` defaults to :data:`FASHION_MNIST_DEFAULT_DIR` for ``"fashion-mnist"``;
    MNIST has no default. Images (n, 28, 28) become rows of 784 floats ``/255``.
    """
    if name not in ("mnist", "fashion-mnist"):
        raise ConfigError(f"load_idx_dataset reads 'mnist' or 'fashion-mnist', not {name!r}")
    if data_dir is None and name == "mnist":
        raise ConfigError("MNIST has no default location and dynsim cannot download it; pass "
                          f"--data-dir DIR (data_dir=...) with the four IDX files "
                          f"{', '.join(_IDX_FILES)} (raw or .gz)")
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DEFAULT_DIR
    paths = [_find_idx_file(name, folder, base) for base in _IDX_FILES]
    x_train, y_train = _idx_pair(paths[0], paths[1])
    x_test, y_test = _idx_pair(paths[2], paths[3])
    return Dataset(name, _flat_unit(x_train), y_train, _flat_unit(x_test), y_test,
                   (1, *x_train.shape[1:]), 10)


def _find_idx_file(name: str, folder: Path, base: str) -> Path:
    """``folder/base`` or ``folder/base.gz``; a DataError saying how to get the data."""
    for path in (folder / base, folder / f"{base}.gz"):
        if path.is_file():
            return path
    where = f"{folder} (missing {base}[.gz])"
    if name == "fashion-mnist":
        raise DataError(f"Fashion-MNIST not found at {where}. Install it with `apt-get install "
                        "dataset-fashion-mnist` or pass --data-dir DIR with the four IDX files.")
    raise DataError(f"MNIST not found at {where}. dynsim cannot download MNIST: put the four "
                    f"IDX files {', '.join(_IDX_FILES)} (raw or .gz) in one directory and pass "
                    "--data-dir DIR.")


def _idx_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W) uint8 and labels (n,) int64 in 0..9, checked against each other."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images (n, H, W), got {images.dtype} "
                        f"{images.shape}")
    if len(images) == 0 or 0 in images.shape[1:]:
        raise DataError(f"{image_path}: holds {len(images)} images of {images.shape[1:]} pixels; "
                        "a data set needs at least one non-empty image")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: expected {len(images)} labels to match {image_path}, "
                        f"got shape {labels.shape}")
    return images, _checked_labels(labels, 10, label_path)


def _checked_labels(labels: np.ndarray, n_classes: int, path: Path) -> np.ndarray:
    """Labels as int64, all in ``0 .. n_classes-1``; DataError naming ``path`` otherwise."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or (labels.size and not
                                         0 <= labels.min() <= labels.max() < n_classes):
        raise DataError(f"{path}: labels must be integers in 0..{n_classes - 1}")
    return labels.astype(np.int64)


def _flat_unit(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, ...) -> float32 rows (n, prod(...)) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255)


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the official "python version" pickles.

    ``data_dir`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``)
    or its parent. Rows of ``b"data"`` are already (3, 32, 32) channel-major; CIFAR-100
    uses the 100 fine labels. The pickles are loaded with an unpickler that only accepts
    NumPy arrays, lists and plain values, so a foreign pickle cannot run code.
    """
    if name not in _CIFAR:
        raise ConfigError(f"load_cifar reads 'cifar10' or 'cifar100', not {name!r}")
    title, subdir, train_files, test_file, key, n_classes, archive = _CIFAR[name]
    folder, missing = _extracted_dir(data_dir, subdir, (*train_files, test_file))
    if missing:
        raise DataError(f"{title} not found at {folder} (missing {missing}). dynsim cannot "
                        f"download it: extract the official \"python version\" archive {archive} "
                        f"(files {', '.join((*train_files, test_file))} in {subdir}/) and pass "
                        "--data-dir DIR.")
    train = [_cifar_batch(folder / f, key, n_classes) for f in train_files]
    x_test, y_test = _cifar_batch(folder / test_file, key, n_classes)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset(name, _flat_unit(x_train), y_train, _flat_unit(x_test), y_test,
                   (3, 32, 32), n_classes)


def _extracted_dir(data_dir: str | Path, subdir: str, files: tuple[str, ...]
                   ) -> tuple[Path, str | None]:
    """``data_dir/subdir`` if that folder exists, else ``data_dir``; and its first missing file."""
    folder = Path(data_dir)
    folder = folder / subdir if (folder / subdir).is_dir() else folder
    return folder, next((file for file in files if not (folder / file).is_file()), None)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals NumPy arrays need."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", attr) for core in ("core", "_core")
        for module, attr in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                             ("numeric", "_frombuffer"))}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: Path, key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> images (n, 3072) uint8 and labels (n,) int64."""
    try:
        with path.open("rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
    except Exception as err:  # corrupt pickles raise almost any type (KeyError, MemoryError..)
        raise DataError(f"{path}: not a CIFAR python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        raise DataError(f"{path}: expected a dict with keys b'data' and {key!r}")
    images = np.asarray(batch[b"data"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be uint8 (n, 3072), got {images.dtype} "
                        f"{images.shape}")
    labels = np.asarray(batch[key])
    if labels.shape != (len(images),):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, _checked_labels(labels, n_classes, path)


def load_stl10(data_dir: str | Path) -> Dataset:
    """STL-10's labelled images (5000 train, 8000 test, 3x96x96) from the binary release.

    ``data_dir`` is the extracted ``stl10_binary`` folder or its parent. Each channel is
    stored column-major, so images are read as (n, 3, 96, 96) and the last two axes
    swapped; labels 1..10 become 0..9. The unlabelled split is not read. In float32 the
    test split alone takes about 0.9 GB.
    """
    folder, missing = _extracted_dir(data_dir, "stl10_binary", _STL_FILES)
    if missing:
        raise DataError(f"STL-10 not found at {folder} (missing {missing}). dynsim cannot "
                        "download it: extract the official binary archive stl10_binary.tar.gz "
                        f"(files {', '.join(_STL_FILES)} in stl10_binary/) and pass "
                        "--data-dir DIR.")
    x_train, y_train = _stl_pair(folder / "train_X.bin", folder / "train_y.bin")
    x_test, y_test = _stl_pair(folder / "test_X.bin", folder / "test_y.bin")
    return Dataset("stl10", x_train, y_train, x_test, y_test, _STL_SHAPE, 10)


def _stl_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 rows (n, 27648) in (C, H, W) order and labels (n,) in 0..9."""
    raw = _read_bytes(image_path, gunzip=False)
    labels = _read_bytes(label_path, gunzip=False)
    size = math.prod(_STL_SHAPE)
    if len(raw) % size:
        raise DataError(f"{image_path}: {len(raw)} bytes is not a whole number of "
                        f"3x96x96 images ({size} bytes each); the file is truncated or corrupt")
    if len(labels) != len(raw) // size:
        raise DataError(f"{label_path}: {len(labels)} labels for {len(raw) // size} images "
                        f"in {image_path}")
    images = np.frombuffer(raw, np.uint8).reshape(-1, *_STL_SHAPE).transpose(0, 1, 3, 2)
    y = _checked_labels(np.frombuffer(labels, np.uint8).astype(np.int64) - 1, 10, label_path)
    return _flat_unit(images), y


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load any of :data:`DATASETS` by name; ``data_dir`` as for the loader it picks."""
    if name == "digits":
        if data_dir is not None:
            raise ConfigError("digits is bundled with scikit-learn and takes no --data-dir")
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dataset(name, data_dir)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise ConfigError(f"{name} cannot be downloaded by dynsim and has no default location; "
                          "pass --data-dir DIR with the extracted files")
    return load_stl10(data_dir) if name == "stl10" else load_cifar(name, data_dir)


def center_per_image(x: np.ndarray) -> np.ndarray:
    """DSSM input: subtract each image's own mean, ``x - x.mean(axis=1, keepdims=True)``.

    ``x`` (n, n_features) is expected already scaled (``/255``). Returns float32 (n, n_features).
    """
    x = check_images(x)
    return (x - x.mean(axis=1, dtype=np.float64, keepdims=True)).astype(np.float32)


def check_images(x: np.ndarray, n_features: int | None = None, *, name: str = "x") -> np.ndarray:
    """Check a data array and return it as float32 (n, n_features).

    Raises :class:`DataError` if ``x`` is not a 2-D numeric array, has the wrong number of
    features, or holds NaN/Inf (naming the first bad sample, e.g. ``x[17] contains NaN``).
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.ndim != 2:
        fix = "for a single sample use" if x.ndim == 1 else "flatten images with"
        shape = "1, -1" if x.ndim == 1 else f"len({name}), -1"
        raise DataError(f"{name} must be 2-D (n_samples, n_features), got shape {x.shape}; "
                        f"{fix} {name}.reshape({shape})")
    if n_features is not None and x.shape[1] != n_features:
        raise DataError(f"{name} has {x.shape[1]} features per sample, expected {n_features}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported below
        x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        bad = x[row][~finite[row]][0]
        what = "NaN" if np.isnan(bad) else f"{bad} (inf, or too large for float32)"
        raise DataError(f"{name}[{row}] contains {what}")
    return x
