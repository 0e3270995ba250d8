r"""Local, translation-equivariant empirical scores on periodic images (issue 19, the pattern-formation seed).

The exact empirical score (eq 18, [`EmpiricalScore`][]) compares the whole noisy state with every
training point, which is why it memorises. A *patch* score replaces that by a local comparison: the
score at pixel $x$ depends only on the noisy patch $u_x$ of side $P$ centred on $x$ (periodic
boundaries, all $k$ modalities),

$$\nabla \log p_t(z)_x = Q^{-1}\Big(E \sum_j w_j(u_x)\, c_j - z_x\Big), \qquad
  w_j(u_x) \propto \exp\!\Big(-\tfrac12 \lVert u_x - E\, p_j \rVert^2_{Q^{-1} \otimes I}\Big),$$

where $(p_j, c_j)$ run over a bank of training patches and their centre pixels, and $E(t), Q(t)$
are the forward process's $k \times k$ mean map and covariance. Two banks:

- `equivariant=True` (the default): every patch of every training image at every position, the same
  bank for all $x$, so the score commutes with cyclic translations of the image. This is the
  equivariant local score machine of Kamb and Ganguli (2024) in the coupled-OU setting.
- `equivariant=False`: at pixel $x$ only the training images' patches at $x$ (locality without
  translation invariance).

With $P = L$ the patch at $x$ is the whole image, cyclically shifted to centre $x$, so
`equivariant=False` *is* [`EmpiricalScore`][] of the training images and `equivariant=True` is
`EmpiricalScore` of the training images and all their cyclic shifts (tested).

Images are 1-D (`(n, k, L)`) or 2-D (`(n, k, L, L)`); a state is `(..., k, d)` with $d = L$ or $L^2$
(row-major), as for every other score here, so the samplers of [`reverse_sde`][] take it unchanged.
The bank is scanned in chunks with an online log-sum-exp, so memory is `queries x chunk`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..theory.ou import CoupledOU
from .scores import EmpiricalScore, _check_state, _moment_path

__all__ = ["PatchScore", "patch_indices"]


def patch_indices(side: int, patch: int, ndim: int) -> np.ndarray:
    """For each pixel of a periodic image of side `side` in `ndim` (1 or 2) dimensions, the flat
    (row-major) indices of the patch of side `patch` centred on it: an `(side**ndim, patch**ndim)`
    integer array, offsets in row-major order from `-(patch // 2)` to `patch // 2`."""
    r = np.arange(patch) - patch // 2
    if ndim == 1:
        return (np.arange(side)[:, None] + r[None, :]) % side
    rows, cols = np.divmod(np.arange(side * side), side)
    pr = (rows[:, None, None] + r[None, :, None]) % side
    pc = (cols[:, None, None] + r[None, None, :]) % side
    return (pr * side + pc).reshape(side * side, patch * patch)


class PatchScore(eqx.Module):
    r"""The patch-wise empirical score of the module docstring. Build it with [`PatchScore.of`][];
    call it as `score(t, z)` with `z` of shape `(..., k, d)`."""

    empirical: EmpiricalScore  # the shared bank (equivariant), or position 0's (a template for the others)
    chunks: jax.Array | None  # without equivariance: each position's training patches, padded into the scan's chunks once
    index: jax.Array  # (d, P**ndim): each pixel's patch, flat indices
    side: int = eqx.field(static=True)
    patch: int = eqx.field(static=True)
    ndim: int = eqx.field(static=True)
    equivariant: bool = eqx.field(static=True)

    @classmethod
    def of(cls, ou: CoupledOU, images, patch: int, *, equivariant: bool = True, chunk: int = 1024, t_max=None) -> "PatchScore":
        """`images`: the training set, `(n, k, L)` (1-D) or `(n, k, L, L)` (2-D), periodic. `patch`: the
        odd side P of the patch, `1 <= P <= L`. `chunk`: bank patches per step of the scan. `t_max`
        bounds the times a time-dependent M will be asked at (its ODE horizon)."""
        images = jnp.asarray(images)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != images.shape[-2]):
            raise ValueError(f"`images` must be (n, k, L) (1-D) or (n, k, L, L) (2-D, square), got shape {images.shape}.")
        n, k, side = images.shape[0], images.shape[1], images.shape[-1]
        if n == 0:
            raise ValueError("`images` is empty: a patch score needs at least one training image.")
        if k != ou.k:
            raise ValueError(f"`images` must have k = {ou.k} modalities on axis 1 (the process's), got {k}.")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            images = images.astype(jnp.result_type(float))
        if not (isinstance(patch, (int, np.integer)) and not isinstance(patch, bool) and patch % 2 == 1 and 1 <= patch <= side):
            raise ValueError(f"`patch` must be an odd integer side in [1, L = {side}] (a patch centred on its pixel), "
                             f"got {patch!r}.")
        if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1):
            raise ValueError(f"`chunk` must be a positive integer, got {chunk!r}.")
        ndim = images.ndim - 2
        index = patch_indices(side, int(patch), ndim)
        path = _moment_path(ou, t_max)
        patches = jnp.moveaxis(images.reshape(n, k, -1)[:, :, index], 2, 0)  # (positions, n, k, P**ndim)
        if equivariant:  # one bank, position-major: entry j is image j % n at position j // n
            emp = EmpiricalScore(path, patches.reshape((-1,) + patches.shape[2:]), min(chunk, patches.shape[0] * n))
            chunks = None
        else:
            c = min(chunk, n)
            emp = EmpiricalScore(path, patches[0], c)
            chunks = jax.vmap(lambda b: EmpiricalScore(path, b, c).chunks)(patches)
        return cls(emp, chunks, jnp.asarray(index), side, int(patch), ndim, bool(equivariant))

    @property
    def dim(self) -> int:
        """d, the flattened image size L or L**2."""
        return self.side**self.ndim

    def _per_pixel(self, t, z):
        """Each pixel's empirical score over its bank, evaluated on its noisy patch: the centre of the
        patch score `(..., d, k)`, then log Z, the best logit and its index, each `(..., d)`."""
        _check_state(z, (self.empirical.points.shape[1], self.dim), "z")
        u = jnp.moveaxis(z[..., self.index], -2, -3)  # (..., d, k, P**ndim): the noisy patches
        c = (self.patch**self.ndim) // 2
        centre = slice(c, c + 1)  # only the centre's score is accumulated
        if self.equivariant:
            score, log_z, best, arg = self.empirical._scan(t, u, centre)
        else:
            def one(chunks, u_x):  # position 0's score with this position's bank (same n, same shapes)
                return eqx.tree_at(lambda e: e.chunks, self.empirical, chunks)._scan(t, u_x, centre)

            score, log_z, best, arg = jax.vmap(one, in_axes=(0, -3), out_axes=(-3, -1, -1, -1))(self.chunks, u)
        return score[..., 0], log_z, best, arg

    def __call__(self, t, z):
        return jnp.swapaxes(self._per_pixel(t, z)[0], -1, -2)

    def max_weight(self, t, z):
        r"""Per pixel, $\max_j w_j(u_x)$ and the training image it belongs to, each of shape `(..., d)`,
        and (third) the position of that patch in its image. Weights near 1 at every pixel, all from
        one image at matching positions, mean the sample copies that image."""
        _, log_z, best, arg = self._per_pixel(t, z)
        if self.equivariant:
            n = self.empirical.points.shape[0] // self.dim
            pos, img = jnp.divmod(arg, n)
        else:
            img, pos = arg, jnp.broadcast_to(jnp.arange(self.dim), arg.shape)
        return jnp.exp(best - log_z), img, pos
