r"""Two-channel MNIST states (eq 90) with MAIN and CTRL pairing (Section 5).

- MAIN: $(x_A, x_B) = (x_i, T(x_i))$, then the channels are swapped with probability 1/2.
- CTRL: $(x_A, x_B) = (x_i, T(x_{\pi(i)}))$ with a permutation $\pi$ redrawn every epoch such
  that $y_i \ne y_{\pi(i)}$ (`class_disjoint_permutation`), and the same random swap.

`PairedMNIST` keeps the images and their transforms as device arrays; a batch is built
inside the jitted training step from integer indices (`batch`), so the input pipeline has
no Python per-example work and no host-to-device copy beyond the indices. The epoch order
and CTRL permutation are a pure function of `(seed, epoch)`, so a resumed run sees the same
data in the same order.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .transforms import get_transform


def class_disjoint_permutation(labels, rng: np.random.Generator, *, max_rounds: int = 200) -> np.ndarray:
    r"""A uniformly shuffled permutation $\pi$ of `range(N)` with `labels[i] != labels[pi[i]]` for all `i`.

    Such a permutation exists iff no class holds more than half of the items; otherwise a
    `ValueError` names the class. Conflicts of a random permutation are repaired by reshuffling
    them together with as many random other positions, which converges in a few rounds; a
    deterministic construction (a cyclic shift of the class-sorted order) is the fallback.
    """
    y = np.asarray(labels).reshape(-1)
    n = len(y)
    classes, counts = np.unique(y, return_counts=True)
    if n == 0 or counts.max() * 2 > n:
        c = classes[np.argmax(counts)] if n else None
        raise ValueError(f"no class-disjoint permutation exists: class {c} has {counts.max() if n else 0} of {n} items "
                         "(more than half). Use more classes or balance them (`balance=True`, `--balance`: as many of each).")
    pi = rng.permutation(n)
    for _ in range(max_rounds):
        bad = np.flatnonzero(y == y[pi])
        if bad.size == 0:
            return pi
        others = rng.choice(n, size=min(n, bad.size + 1), replace=False)
        pos = np.unique(np.concatenate([bad, others]))
        pi[pos] = pi[rng.permutation(pos)]
    # fallback: shift the class-sorted order by the largest class size
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in rng.permutation(classes)])
    pi = np.empty(n, np.int64)
    pi[order] = order[(np.arange(n) + counts.max()) % n]
    return pi


class PairedMNIST(eqx.Module):
    """MNIST images, their transform, and the pairing rule; see the module docstring.

    **Arguments:**

    - `images`: `(N, 28, 28)` in [0, 1] (e.g. from `load_mnist`).
    - `labels`: `(N,)` integer labels.
    - `transform`: a name in `TRANSFORMS` ("edge", "invert", "dilate", "blur").
    - `pairing`: "main" or "ctrl".
    - `classes`: keep only these labels (e.g. two classes for the cloning protocol, Section 5.2).
    - `swap`: swap the channels with probability 1/2 (the paper's A/B exchange symmetry).
    - `symmetric`: scale pixels from [0, 1] to [-1, 1] (the usual diffusion convention).
    """

    x: Float[Array, "N H W"]
    tx: Float[Array, "N H W"]
    labels: Int[Array, " N"]
    pairing: str = eqx.field(static=True)
    swap: bool = eqx.field(static=True)
    symmetric: bool = eqx.field(static=True)

    def __init__(self, images, labels, *, transform: str = "edge", pairing: Literal["main", "ctrl"] = "main",
                 classes=None, swap: bool = True, symmetric: bool = True, transform_kwargs: dict | None = None):
        if pairing not in ("main", "ctrl"):
            raise ValueError(f"`pairing` must be 'main' or 'ctrl', got {pairing!r}.")
        images, labels = np.asarray(images, np.float32), np.asarray(labels).astype(np.int32)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"need images (N, H, W) and labels (N,), got shapes {images.shape} and {labels.shape}.")
        finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"`images` hold non-finite pixels in {len(bad)} of {len(images)} images, the first at index {int(bad[0])}.")
        if classes is not None:
            classes = sorted({int(c) for c in classes})
            keep = np.isin(labels, classes)
            missing = [c for c in classes if not np.any(labels == c)]
            if missing:
                raise ValueError(f"`classes` {missing} do not occur in the labels.")
            images, labels = images[keep], labels[keep]
        if pairing == "ctrl":
            class_disjoint_permutation(labels, np.random.default_rng(0), max_rounds=1)  # existence check, raises early
        t = get_transform(transform, **(transform_kwargs or {}))
        tx = np.concatenate([np.asarray(jax.jit(t)(images[i: i + 4096])) for i in range(0, len(images), 4096)])
        self.x, self.tx, self.labels = jnp.asarray(images), jnp.asarray(tx, jnp.float32), jnp.asarray(labels)
        self.pairing, self.swap, self.symmetric = pairing, swap, symmetric

    def __len__(self) -> int:
        return self.x.shape[0]

    def epoch_indices(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`(a, b)`: the epoch's order of the A images and of their partners (b = a for MAIN, pi[a] for CTRL)."""
        rng = np.random.default_rng([int(seed), int(epoch)])
        a = rng.permutation(len(self)).astype(np.int32)
        if self.pairing == "main":
            return a, a
        pi = class_disjoint_permutation(np.asarray(self.labels), rng)
        return a, pi[a].astype(np.int32)

    def batch(self, a: Int[Array, " B"], b: Int[Array, " B"], key) -> Float[Array, "B H W 2"]:
        """The two-channel states `(B, H, W, 2)` = (x_a, T(x_b)), each swapped with probability 1/2 (jit-friendly)."""
        xa, xb = self.x[a], self.tx[b]
        z = jnp.stack([xa, xb], axis=-1)
        if self.swap:
            flip = jax.random.bernoulli(key, 0.5, (a.shape[0], 1, 1, 1))
            z = jnp.where(flip, z[..., ::-1], z)
        return 2 * z - 1 if self.symmetric else z
