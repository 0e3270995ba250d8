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

[`GaussianPatchScore`][] is the analytically tractable counterpart: the patch distribution is a mixture
of Gaussian clusters with a shared covariance (one cluster: the Gaussian limit; two: the two-cluster
limit), so the noisy patch density is known in closed form at every $t$ and its score is a softmax over
clusters instead of over training patches. Both expose the centre-pixel score of a single patch, which
`criticality.py` differentiates for the exact Fourier growth rates.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..theory.moments import MomentPath
from ..theory.ou import CoupledOU
from .scores import EmpiricalScore, _check_state, _moment_path

__all__ = ["GaussianPatchScore", "PatchScore", "patch_indices"]


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
        images = _check_images(ou, images, patch)
        n, k, side = images.shape[0], images.shape[1], images.shape[-1]
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

    def centre_score(self, t, u):
        r"""The score at the centre pixel of noisy patches `u` of shape `(..., k, P**ndim)`, against the shared
        bank: `(..., k)`. Only the equivariant score is the same function of the patch at every pixel."""
        if not self.equivariant:
            raise ValueError("`centre_score` needs `equivariant=True`: the position-locked score uses a different bank at each pixel.")
        c = (self.patch**self.ndim) // 2
        return self.empirical._scan(t, u, slice(c, c + 1))[0][..., 0]

    def mean_state(self, t):
        r"""The linearisation point of the growth rates: $E(t)\bar m$, $\bar m$ the per-modality mean of the
        training images, `(k,)` (constant across pixels)."""
        E, _ = self.empirical.path(t)
        return E @ jnp.mean(self.empirical.points, axis=(0, 2)).astype(E.dtype)

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


class GaussianPatchScore(eqx.Module):
    r"""The patch score of a Gaussian-mixture patch model, in closed form (the Gaussian and two-cluster limits).

    The patches $y \in \mathbb{R}^{k \times P^{n}}$ ($n$ = 1 or 2 spatial dimensions) follow
    $\sum_c \pi_c\, \mathcal N(m_c, \Sigma)$ with a shared covariance $\Sigma$. Under the forward process
    the noisy patch is $u = (E \otimes I) y + \text{noise}$ with per-pixel covariance $Q$, so
    $p_t(u) = \sum_c \pi_c\, \mathcal N\big(u; (E \otimes I) m_c, S_t\big)$ with
    $S_t = (E \otimes I)\Sigma(E \otimes I)^\top + Q \otimes I$, and the score at pixel $x$ is the centre
    component of the noisy patch density's score at $u_x$ (Tweedie's formula applied patch-wise, as for
    [`PatchScore`][]):

    $$s_x(z) = -\big[S_t^{-1}\big(u_x - (E \otimes I) \textstyle\sum_c w_c(u_x)\, m_c\big)\big]_{\text{centre}},
      \qquad w_c \propto \pi_c\, \mathcal N\big(u_x; (E \otimes I) m_c, S_t\big).$$

    One cluster gives a linear (convolutional) score; two clusters a linear score plus one softmax. With
    $P = L$ and cluster means constant across pixels, the two-cluster model with $\Sigma = \Sigma_0 \otimes I$
    is [`PopulationScore`][] of a [`TwoClassMixture`][] (tested). Build it with [`GaussianPatchScore.fit`][]
    (from images) or [`GaussianPatchScore.of`][] (from the moments); call it as `score(t, z)`.
    """

    path: MomentPath
    means: jax.Array  # (clusters, k, P**ndim)
    cov: jax.Array  # (k P**ndim, k P**ndim), flat index a * P**ndim + j
    log_weights: jax.Array  # (clusters,)
    index: jax.Array  # (d, P**ndim)
    side: int = eqx.field(static=True)
    patch: int = eqx.field(static=True)
    ndim: int = eqx.field(static=True)

    @classmethod
    def of(cls, ou: CoupledOU, means, cov, *, side: int, ndim: int, weights=None, t_max=None) -> "GaussianPatchScore":
        r"""From the patch model's moments. `means`: `(clusters, k, P**ndim)` (or `(k, P**ndim)` for one
        cluster), patch pixels row-major; `cov`: the shared $(kP^n) \times (kP^n)$ covariance, index
        `a * P**ndim + j` for modality `a` and patch pixel `j` (positive semi-definite); `weights`: the
        cluster probabilities (default uniform); `side`: the image side L; `ndim`: 1 or 2."""
        means = jnp.asarray(means)
        if not jnp.issubdtype(means.dtype, jnp.floating):
            means = means.astype(jnp.result_type(float))
        if means.ndim == 2:
            means = means[None]
        if ndim not in (1, 2):
            raise ValueError(f"`ndim` must be 1 or 2 (1-D or 2-D images), got {ndim!r}.")
        if means.ndim != 3 or means.shape[1] != ou.k:
            raise ValueError(f"`means` must have shape (clusters, k = {ou.k}, P**ndim), got {means.shape}.")
        n_pix = means.shape[2]
        patch = round(n_pix ** (1 / ndim))
        if patch**ndim != n_pix or patch % 2 == 0:
            raise ValueError(f"`means` has {n_pix} patch pixels: that must be P**ndim = P**{ndim} for an odd side P.")
        if not (isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side >= patch):
            raise ValueError(f"`side` must be an integer L >= P = {patch} (the patch side), got {side!r}.")
        cov = jnp.asarray(cov, means.dtype)
        kp = ou.k * n_pix
        if cov.shape != (kp, kp):
            raise ValueError(f"`cov` must be ({kp}, {kp}) = (k P**ndim, k P**ndim), got {cov.shape}.")
        c = np.asarray(cov) if not isinstance(cov, jax.core.Tracer) else None
        if c is not None and (not np.all(np.isfinite(c)) or not np.allclose(c, c.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(c).max()))
                              or np.linalg.eigvalsh(0.5 * (c + c.T)).min() < -1e-8 * max(1.0, np.abs(c).max())):
            raise ValueError("`cov` must be a finite, symmetric, positive semi-definite covariance.")
        n_c = means.shape[0]
        if weights is None:
            weights = jnp.full((n_c,), 1.0 / n_c, means.dtype)
        weights = jnp.asarray(weights, means.dtype)
        w = np.asarray(weights) if not isinstance(weights, jax.core.Tracer) else None
        if weights.shape != (n_c,) or (w is not None and (not np.all(w > 0) or abs(w.sum() - 1) > 1e-6)):
            got = w if w is not None else weights.shape
            raise ValueError(f"`weights` must be {n_c} positive cluster probabilities summing to 1, got {got}.")
        index = jnp.asarray(patch_indices(int(side), patch, ndim))
        return cls(_moment_path(ou, t_max), means, 0.5 * (cov + cov.T), jnp.log(weights), index, int(side), patch, int(ndim))

    @classmethod
    def fit(cls, ou: CoupledOU, images, patch: int, *, clusters: int = 1, iterations: int = 20, t_max=None) -> "GaussianPatchScore":
        r"""Fit the model to the patches of `images` at every position (periodic; the bank of an
        equivariant [`PatchScore`][]). `clusters=1`: their mean and covariance (the Gaussian limit: a
        stationary covariance, since every position counts). `clusters=2`: the patches split in two by
        Lloyd's 2-means (`iterations` rounds, started from the sign of the top principal component), the
        cluster means, the pooled within-cluster covariance and the cluster fractions (the two-cluster limit)."""
        images = _check_images(ou, images, patch)
        if clusters not in (1, 2):
            raise ValueError(f"`clusters` must be 1 (the Gaussian limit) or 2 (the two-cluster limit), got {clusters!r}.")
        n, k, side = images.shape[0], images.shape[1], images.shape[-1]
        ndim = images.ndim - 2
        index = patch_indices(side, int(patch), ndim)
        bank = np.asarray(images).reshape(n, k, -1)[:, :, index]  # (n, k, d, P**ndim)
        bank = np.moveaxis(bank, 2, 1).reshape(n * side**ndim, k * index.shape[1])
        if clusters == 1:
            labels = np.zeros(bank.shape[0], int)
        else:
            centred = bank - bank.mean(0)
            top = np.linalg.eigh(centred.T @ centred)[1][:, -1]
            labels = (centred @ top > 0).astype(int)
            for _ in range(int(iterations)):
                if labels.min() == labels.max():
                    break
                mu = np.stack([bank[labels == c].mean(0) for c in (0, 1)])
                new = np.argmin(((bank[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
                if np.array_equal(new, labels):
                    break
                labels = new
            if labels.min() == labels.max():
                raise ValueError("The patches do not split into two clusters (they are all alike): use `clusters=1`.")
        means = np.stack([bank[labels == c].mean(0) for c in range(clusters)])
        resid = bank - means[labels]
        cov = resid.T @ resid / bank.shape[0]
        weights = np.bincount(labels, minlength=clusters) / bank.shape[0]
        dtype = images.dtype
        return cls.of(ou, jnp.asarray(means.reshape(clusters, k, -1), dtype), jnp.asarray(cov, dtype), side=side, ndim=ndim,
                      weights=jnp.asarray(weights, dtype), t_max=t_max)

    @property
    def dim(self) -> int:
        """d, the flattened image size L or L**2."""
        return self.side**self.ndim

    def _noisy(self, t, dtype):
        """$S_t^{-1}$ and the noisy cluster means $(E \\otimes I) m_c$, flat."""
        E, Q = self.path(t)
        k, n_pix = self.means.shape[1:]
        eye = jnp.eye(n_pix, dtype=E.dtype)
        EI = jnp.kron(E, eye)
        S = EI @ self.cov.astype(E.dtype) @ EI.T + jnp.kron(0.5 * (Q + Q.T), eye)
        S = 0.5 * (S + S.T)
        Si = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(S), jnp.eye(S.shape[0], dtype=S.dtype))
        mu = jnp.einsum("ab,cbj->caj", E, self.means.astype(E.dtype)).reshape(self.means.shape[0], -1)
        return (0.5 * (Si + Si.T)).astype(dtype), mu.astype(dtype)

    def centre_score(self, t, u):
        r"""The score at the centre pixel of noisy patches `u` of shape `(..., k, P**ndim)`: `(..., k)`."""
        Si, mu = self._noisy(t, u.dtype)
        k, n_pix = self.means.shape[1:]
        r = u.reshape(u.shape[:-2] + (1, k * n_pix)) - mu  # (..., clusters, kP)
        v = r @ Si
        logits = self.log_weights.astype(u.dtype) - 0.5 * jnp.sum(r * v, -1)
        w = jax.nn.softmax(logits, axis=-1)
        centre = jnp.arange(k) * n_pix + n_pix // 2
        return -jnp.einsum("...c,...ca->...a", w, v[..., centre])

    def mean_state(self, t):
        r"""The linearisation point of the growth rates: $E(t)\bar m$ with $\bar m$ the per-modality mean
        of the mixture's mean patch, `(k,)` (constant across pixels)."""
        E, _ = self.path(t)
        m = jnp.einsum("c,caj->a", jnp.exp(self.log_weights), self.means) / self.means.shape[2]
        return E @ m.astype(E.dtype)

    def __call__(self, t, z):
        _check_state(z, (self.means.shape[1], self.dim), "z")
        u = jnp.moveaxis(z[..., self.index], -2, -3)  # (..., d, k, P**ndim)
        return jnp.swapaxes(self.centre_score(t, u), -1, -2)


def _check_images(ou, images, patch):
    """`images` as a float array `(n, k, L)` or `(n, k, L, L)`, and `patch` an odd side in [1, L]."""
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
        raise ValueError(f"`patch` must be an odd integer side in [1, L = {side}] (a patch centred on its pixel), got {patch!r}.")
    return images
