"""Data: open-set splits for the demo and the benchmarks, and the offline IDX loader.

* :mod:`~laplace_metric.data.open_set`: open-set splits (in-distribution classes, held-out
  classes and uniform noise) of digits, MNIST and FashionMNIST (formerly
  ``laplace_metric.datasets``);
* :mod:`~laplace_metric.data.idx`: reading, writing and locating MNIST-format IDX files
  offline (formerly ``laplace_metric.idx``).
"""

from __future__ import annotations

from laplace_metric.data.idx import (
    IDXDataset,
    IDXSplit,
    find_idx_folder,
    load_idx_dataset,
    packaged_folder,
    read_idx,
    write_idx,
)
from laplace_metric.data.open_set import (
    OpenSetDataset,
    OpenSetSplit,
    digits_open_set,
    open_set_split,
)

__all__ = [
    "IDXDataset",
    "IDXSplit",
    "OpenSetDataset",
    "OpenSetSplit",
    "digits_open_set",
    "find_idx_folder",
    "load_idx_dataset",
    "open_set_split",
    "packaged_folder",
    "read_idx",
    "write_idx",
]
