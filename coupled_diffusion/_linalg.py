"""Small-matrix linear algebra for batched k x k work (k is the number of modalities).

Under `vmap`, a batch of k x k matrices is an array of shape `(N, k, k)`, and XLA's CPU
kernels for tiny batched `dot`, `inv` and `solve` are dominated by per-matrix overhead
(a batched 2 x 2 `inv` costs ~70x the cofactor formula), while even elementwise-fused
products vectorise poorly over the strided `k x k` minor axes.

[`Mat`][] stores a small matrix as its k^2 entries, each an array of the batch shape
("structure of arrays"). Every operation is then a handful of scalar multiply-adds over
contiguous batch arrays, which XLA fuses and vectorises: the 64-step kappa scan of the
speciation solver runs 5x faster this way than on `(N, 2, 2)` arrays. Products and
cofactor inverses are written out for k <= 4; a larger matrix is a [`DenseMat`][] (one
array, the dense `jnp.linalg` routines) behind the same interface. `Mat` is a PyTree, so it goes through `scan`, `where` (via
`select`), `jit`, `vmap` and `grad` like an array.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

_SMALL = 4


@jax.tree_util.register_pytree_node_class
class Mat:
    """A small square matrix held entry by entry (see the module docstring)."""

    __slots__ = ("rows",)

    def __new__(cls, rows):
        rows = tuple(tuple(r) for r in rows)
        if len(rows) > _SMALL:  # a larger matrix is one dense array: entry lists would unroll O(k^3) scalar ops
            entries = jnp.broadcast_arrays(*(jnp.asarray(a) for r in rows for a in r))
            k = len(rows)
            return DenseMat(jnp.stack(entries, -1).reshape(entries[0].shape + (k, k)))
        self = object.__new__(cls)
        self.rows = rows
        return self

    # -- PyTree ----------------------------------------------------------------------
    def tree_flatten(self):
        k = len(self.rows)
        return tuple(itertools.chain.from_iterable(self.rows)), k

    @classmethod
    def tree_unflatten(cls, k, leaves):
        leaves = tuple(leaves)
        return cls(leaves[i * k : (i + 1) * k] for i in range(k))

    # -- conversion ------------------------------------------------------------------
    @classmethod
    def of(cls, A) -> "Mat":
        """From an array of shape `batch + (k, k)`."""
        A = jnp.asarray(A)
        k = A.shape[-1]
        if k > _SMALL:
            return DenseMat(A)
        return cls([[A[..., i, j] for j in range(k)] for i in range(k)])

    @classmethod
    def eye(cls, k: int, like) -> "Mat":
        if k > _SMALL:
            return DenseMat(jnp.eye(k, dtype=jnp.result_type(like)) * jnp.ones_like(like)[..., None, None])
        one, zero = jnp.ones_like(like), jnp.zeros_like(like)
        return cls([[one if i == j else zero for j in range(k)] for i in range(k)])

    @classmethod
    def zeros(cls, k: int, like) -> "Mat":
        if k > _SMALL:
            return DenseMat(jnp.zeros(jnp.shape(like) + (k, k), jnp.result_type(like)))
        zero = jnp.zeros_like(like)
        return cls([[zero] * k for _ in range(k)])

    def array(self):
        """As an array of shape `batch + (k, k)`."""
        return jnp.stack([jnp.stack(r, -1) for r in self.rows], -2)

    @property
    def k(self) -> int:
        return len(self.rows)

    def __getitem__(self, ij):
        i, j = ij
        return self.rows[i][j]

    # -- arithmetic ------------------------------------------------------------------
    def _map(self, f, other=None):
        if other is None:
            return Mat([[f(a) for a in r] for r in self.rows])
        return Mat([[f(a, b) for a, b in zip(r, s)] for r, s in zip(self.rows, other.rows)])

    def __add__(self, other):
        return self._map(jnp.add, other)

    def __sub__(self, other):
        return self._map(jnp.subtract, other)

    def __neg__(self):
        return self._map(jnp.negative)

    def __mul__(self, c):
        """Multiplication by a scalar (or an array of the batch shape)."""
        return self._map(lambda a: a * c)

    __rmul__ = __mul__

    def __truediv__(self, c):
        return self._map(lambda a: a / c)

    def __matmul__(self, other):
        k = self.k
        if k > _SMALL:
            return Mat.of(self.array() @ other.array())
        B = other.rows
        return Mat([[_dot(r, [B[l][j] for l in range(k)]) for j in range(k)] for r in self.rows])

    @property
    def T(self) -> "Mat":
        return Mat(zip(*self.rows))

    def sym(self) -> "Mat":
        """$(A + A^T)/2$, written so that the result is exactly symmetric."""
        k = self.k
        out = [[None] * k for _ in range(k)]
        for i in range(k):
            out[i][i] = self.rows[i][i]
            for j in range(i + 1, k):
                out[i][j] = out[j][i] = 0.5 * (self.rows[i][j] + self.rows[j][i])
        return Mat(out)

    def trace(self):
        return sum(self.rows[i][i] for i in range(self.k))

    def det(self):
        k = self.k
        A = self.rows
        if k == 1:
            return A[0][0]
        if k == 2:
            return A[0][0] * A[1][1] - A[0][1] * A[1][0]
        if k <= _SMALL:
            cof = _cofactors(A)
            return _dot(A[0], cof[0])
        return jnp.linalg.det(self.array())

    def inv(self) -> "Mat":
        """Inverse by the cofactor formula (k <= 4), else `jnp.linalg.inv`."""
        k = self.k
        A = self.rows
        if k == 1:
            return Mat([[1.0 / A[0][0]]])
        if k == 2:
            d = A[0][0] * A[1][1] - A[0][1] * A[1][0]
            return Mat([[A[1][1] / d, -A[0][1] / d], [-A[1][0] / d, A[0][0] / d]])
        if k <= _SMALL:
            cof = _cofactors(A)
            d = _dot(A[0], cof[0])
            return Mat([[cof[j][i] / d for j in range(k)] for i in range(k)])
        return Mat.of(jnp.linalg.inv(self.array()))

    def where(self, pred, other) -> "Mat":
        """Entrywise `jnp.where(pred, self, other)`."""
        return self._map(lambda a, b: jnp.where(pred, a, b), other)


@jax.tree_util.register_pytree_node_class
class DenseMat:
    """A k x k matrix with k > 4 held as one array of shape `batch + (k, k)`, with [`Mat`][]'s interface: `Mat(...)`,
    `Mat.of`, `Mat.eye` and `Mat.zeros` return one for such k. Entry lists would write every product out as O(k^3)
    scalar operations (the speciation solver for k = 8 took 45 s to trace and compile), where the dense routines
    are a few operations whatever k."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a

    def tree_flatten(self):
        return (self.a,), None

    @classmethod
    def tree_unflatten(cls, _, leaves):
        return cls(leaves[0])

    def array(self):
        return self.a

    @property
    def k(self) -> int:
        return self.a.shape[-1]

    def __getitem__(self, ij):
        i, j = ij
        return self.a[..., i, j]

    @staticmethod
    def _scalar(c):
        return jnp.asarray(c)[..., None, None]

    def __add__(self, other):
        return DenseMat(self.a + other.a)

    def __sub__(self, other):
        return DenseMat(self.a - other.a)

    def __neg__(self):
        return DenseMat(-self.a)

    def __mul__(self, c):
        return DenseMat(self.a * self._scalar(c))

    __rmul__ = __mul__

    def __truediv__(self, c):
        return DenseMat(self.a / self._scalar(c))

    def __matmul__(self, other):
        return DenseMat(self.a @ other.a)

    @property
    def T(self) -> "DenseMat":
        return DenseMat(jnp.swapaxes(self.a, -1, -2))

    def sym(self) -> "DenseMat":
        return DenseMat(0.5 * (self.a + jnp.swapaxes(self.a, -1, -2)))  # a_ij + a_ji is exactly symmetric

    def trace(self):
        return jnp.trace(self.a, axis1=-2, axis2=-1)

    def det(self):
        return jnp.linalg.det(self.a)

    def inv(self) -> "DenseMat":
        return DenseMat(jnp.linalg.inv(self.a))

    def where(self, pred, other) -> "DenseMat":
        return DenseMat(jnp.where(self._scalar(pred), self.a, other.a))


def _dot(xs, ys):
    out = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:]):
        out = out + x * y
    return out


def _minor_det(A, rows, cols):
    if len(rows) == 1:
        return A[rows[0]][cols[0]]
    total = None
    for n, c in enumerate(cols):
        term = A[rows[0]][c] * _minor_det(A, rows[1:], cols[:n] + cols[n + 1 :])
        total = term if total is None else (total - term if n % 2 else total + term)
    return total


def _cofactors(A):
    k = len(A)
    idx = tuple(range(k))
    return [
        [(-1) ** (i + j) * _minor_det(A, idx[:i] + idx[i + 1 :], idx[:j] + idx[j + 1 :]) for j in range(k)]
        for i in range(k)
    ]


def trace_mm(A: Mat, B: Mat):
    r"""$\operatorname{tr}(AB)$ without forming the product."""
    if isinstance(A, DenseMat):
        return jnp.einsum("...ij,...ji->...", A.a, B.array())
    k = A.k
    return sum(A[i, j] * B[j, i] for i in range(k) for j in range(k))


def positive_stable(X: Mat):
    """Whether every eigenvalue of the real matrix `X` has a positive real part.

    Routh-Hurwitz on the characteristic polynomial of `-X` (coefficients from the
    Faddeev-LeVerrier recursion): no eigen-decomposition, so it works for defective and
    non-normal matrices, under `jit`/`vmap`/`grad`, on every backend.
    """
    k = X.k
    A = -X
    if k == 1:
        return X[0, 0] > 0
    if k == 2:
        return (X.trace() > 0) & (X.det() > 0)
    # characteristic polynomial lambda^k + c_1 lambda^{k-1} + ... + c_k of A
    like = X[0, 0]
    eye = Mat.eye(k, like)
    Mk = Mat.zeros(k, like)
    c = jnp.ones_like(like)
    a = [c]
    for j in range(1, k + 1):
        Mk = A @ Mk + eye * c
        c = -trace_mm(A, Mk) / j
        a.append(c)

    # Hurwitz matrix H[i, j] = a_{2(j+1) - (i+1)}, zero out of range
    def coef(n):
        return a[n] if 0 <= n <= k else jnp.zeros_like(like)

    ok = jnp.ones(jnp.shape(like), bool)
    if isinstance(X, DenseMat):  # the Hurwitz matrix once, its leading minors by dense determinants
        coefs = jnp.stack(a + [jnp.zeros_like(like)], -1)  # index k + 1: zero
        idx = np.array([[2 * (j + 1) - (i + 1) for j in range(k)] for i in range(k)])
        H = coefs[..., np.where((idx >= 0) & (idx <= k), idx, k + 1)]
        for m in range(1, k + 1):
            ok = ok & (jnp.linalg.det(H[..., :m, :m]) > 0)
        return ok
    for m in range(1, k + 1):
        H = Mat([[coef(2 * (j + 1) - (i + 1)) for j in range(m)] for i in range(m)])
        ok = ok & (H.det() > 0)
    return ok


def kron_apply(A, z):
    r"""$(A \otimes I_d)\, z$: a $k \times k$ matrix `A` applied along the modality axis of states `z` of shape `(..., k, d)`."""
    return jnp.einsum("ij,...jd->...id", A, z)
