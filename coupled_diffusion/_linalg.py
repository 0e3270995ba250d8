"""Small-matrix linear algebra for batched k x k work (k is the number of modalities).

Under `vmap`, XLA's CPU kernels for tiny batched `dot`, `inv` and `solve` are dominated
by per-matrix overhead (a batched 2 x 2 `inv` costs ~70x the cofactor formula here).
These helpers express k <= 3 operations elementwise so XLA fuses them, and fall back
to the general routines for larger k.
"""

import jax.numpy as jnp

_SMALL = 4


def mm(A, B):
    """Matrix product `A @ B`, elementwise-fused for small k."""
    if A.shape[-1] <= _SMALL:
        return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)
    return A @ B


def mT(A):
    return jnp.swapaxes(A, -1, -2)


def det(A):
    k = A.shape[-1]
    if k == 1:
        return A[..., 0, 0]
    if k == 2:
        return A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
    if k == 3:
        return jnp.sum(A[..., 0, :] * _cof3(A)[..., 0, :], axis=-1)
    return jnp.linalg.det(A)


def _cof3(A):
    # cofactor matrix of a 3 x 3 matrix (row i, column j)
    def c(i, j):
        r = [x for x in range(3) if x != i]
        s = [x for x in range(3) if x != j]
        minor = A[..., r[0], s[0]] * A[..., r[1], s[1]] - A[..., r[0], s[1]] * A[..., r[1], s[0]]
        return (-1) ** (i + j) * minor

    return jnp.stack([jnp.stack([c(i, j) for j in range(3)], -1) for i in range(3)], -2)


def inv(A):
    """Inverse; cofactor formula for k <= 3."""
    k = A.shape[-1]
    if k == 1:
        return 1.0 / A
    if k == 2:
        adj = jnp.stack(
            [jnp.stack([A[..., 1, 1], -A[..., 0, 1]], -1), jnp.stack([-A[..., 1, 0], A[..., 0, 0]], -1)], -2
        )
        return adj / det(A)[..., None, None]
    if k == 3:
        return mT(_cof3(A)) / det(A)[..., None, None]
    return jnp.linalg.inv(A)


def trace(A):
    return jnp.trace(A, axis1=-2, axis2=-1)


def positive_stable(X):
    """Whether every eigenvalue of the real matrix `X` has a positive real part.

    Routh-Hurwitz on the characteristic polynomial of `-X` (coefficients from the
    Faddeev-LeVerrier recursion): no eigen-decomposition, so it works for defective and
    non-normal matrices, under `jit`/`vmap`/`grad`, on every backend.
    """
    k = X.shape[-1]
    A = -X
    # characteristic polynomial lambda^k + c_1 lambda^{k-1} + ... + c_k of A
    eye = jnp.eye(k, dtype=X.dtype)
    Mk = jnp.zeros_like(A)
    coeffs = []
    c = jnp.ones(A.shape[:-2], X.dtype)
    for j in range(1, k + 1):
        Mk = mm(A, Mk) + c[..., None, None] * eye
        c = -trace(mm(A, Mk)) / j
        coeffs.append(c)
    a = [jnp.ones_like(coeffs[0])] + coeffs  # a_0 = 1, a_1..a_k
    # Hurwitz matrix H[i, j] = a_{2(j+1) - (i+1)}, zero out of range
    def coef(n):
        return a[n] if 0 <= n <= k else jnp.zeros_like(a[0])

    H = jnp.stack([jnp.stack([coef(2 * (j + 1) - (i + 1)) for j in range(k)], -1) for i in range(k)], -2)
    ok = jnp.ones(A.shape[:-2], bool)
    for m in range(1, k + 1):
        ok = ok & (det(H[..., :m, :m]) > 0)
    return ok
