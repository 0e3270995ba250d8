"""The forward process dZ = M Z dt + sigma_W dW with k coupled modalities (eq 1-4).

M is a constant k x k matrix, or a time-dependent M(t) given as a callable (for example
the symmetric or anisotropic M with a coupling schedule g(t), eq 144).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import as_float, check_finite, check_positive, check_square, concrete
from .._linalg import Mat, positive_stable
from .._types import KxK, Scalar, ScalarLike

STRUCTURES = ("general", "symmetric", "anisotropic")


class CoupledOU(eqx.Module):
    r"""A forward Ornstein-Uhlenbeck process $dZ = (M \otimes I_d) Z\,dt + \sigma_W\,dW$.

    **Arguments:**

    - `M`: the $k \times k$ relaxation (drift) matrix; any real matrix, including
        defective ones such as the anisotropic coupling of eq (3).
    - `sigma_w2`: the noise variance $\sigma_W^2 > 0$ of every modality.
    - `structure`: `"general"` (default), or `"symmetric"` / `"anisotropic"` as set by
        the constructors [`CoupledOU.symmetric`][] and [`CoupledOU.anisotropic`][]. It is
        static metadata: it enables the eigenmode formulas and the stability check
        $\beta > |g|$ even when the parameters are traced.
    """

    M: KxK | Callable
    sigma_w2: Scalar
    structure: str = eqx.field(static=True, default="general")

    def __init__(self, M, sigma_w2: ScalarLike, *, structure: str = "general"):
        if callable(M):
            out = jax.eval_shape(M, 0.0)
            if len(out.shape) != 2 or out.shape[0] != out.shape[1]:
                raise ValueError(f"A time-dependent `M` must map t to a square k x k matrix, got shape {out.shape}.")
            sigma_w2 = as_float(sigma_w2, "sigma_w2")
            if sigma_w2.ndim != 0:
                raise ValueError(f"`sigma_w2` must be a scalar, got shape {sigma_w2.shape}.")
            check_finite(sigma_w2, "sigma_w2")
            check_positive(sigma_w2, "sigma_w2")
            self.M, self.sigma_w2, self.structure = M, sigma_w2, structure
            return
        M = as_float(M, "M")
        check_square(M, "M")
        sigma_w2 = as_float(sigma_w2, "sigma_w2")
        if sigma_w2.ndim != 0:
            raise ValueError(f"`sigma_w2` must be a scalar, got shape {sigma_w2.shape}.")
        if structure not in STRUCTURES:
            raise ValueError(f"`structure` must be one of {STRUCTURES}, got {structure!r}.")
        check_finite(M, "M")
        check_finite(sigma_w2, "sigma_w2")
        check_positive(sigma_w2, "sigma_w2")
        dtype = jnp.result_type(M, sigma_w2)
        self.M = M.astype(dtype)
        self.sigma_w2 = sigma_w2.astype(dtype)
        self.structure = structure

    @classmethod
    def symmetric(cls, beta: ScalarLike, g: ScalarLike, sigma_w2: ScalarLike) -> "CoupledOU":
        r"""Symmetric coupling $M = [[-\beta, g], [g, -\beta]]$ (eq 2); needs $\beta > |g|$.

        `g` may be a callable schedule $t \mapsto g(t)$; then $M$ is time-dependent.
        """
        if callable(g):
            drift = StructuredDrift(as_float(beta, "beta"), g, "symmetric")
            b, sup = concrete(drift.beta), drift.sup_abs_g()
            sup = None if sup is None else concrete(sup)
            if b is not None and sup is not None and not b > sup:
                raise ValueError(
                    f"The symmetric M of eq (2) needs |g(t)| < beta at every time for a stable forward process; "
                    f"this schedule reaches sup |g(t)| = {float(sup):g} >= beta = {float(b):g}. Bound it, e.g. "
                    f"`Bounded(schedule, bound)` or `PiecewiseLinear.from_values(..., bound=b)` with b < beta."
                )
            return cls(drift, sigma_w2, structure="symmetric")
        beta, g = as_float(beta, "beta"), as_float(g, "g")
        _check_scalars(beta=beta, g=g)
        b, gg = concrete(beta), concrete(g)
        if b is not None and gg is not None and not b > abs(gg):
            raise ValueError(
                f"The symmetric M of eq (2) needs beta > |g| for a stable forward "
                f"process; got beta={float(b)}, g={float(gg)}. Decrease |g| or increase beta."
            )
        M = jnp.stack([jnp.stack([-beta, g]), jnp.stack([g, -beta])])
        return cls(M, sigma_w2, structure="symmetric")

    @classmethod
    def anisotropic(cls, beta: ScalarLike, g: ScalarLike, sigma_w2: ScalarLike) -> "CoupledOU":
        r"""One-way coupling $M = [[-\beta, 0], [g, -\beta]]$ (eq 3): X drives Y.

        $M$ is defective (a single eigenvalue $-\beta$ with one eigenvector), so all
        moments come from the matrix exponential, never from an eigenbasis. `g` may be a
        callable schedule $t \mapsto g(t)$ (eq 141, 144); then $M$ is time-dependent.
        """
        if callable(g):
            return cls(StructuredDrift(as_float(beta, "beta"), g, "anisotropic"), sigma_w2, structure="anisotropic")
        beta, g = as_float(beta, "beta"), as_float(g, "g")
        _check_scalars(beta=beta, g=g)
        b = concrete(beta)
        if b is not None and not b > 0:
            raise ValueError(f"The anisotropic M of eq (3) needs beta > 0; got beta={float(b)}.")
        zero = jnp.zeros_like(beta + g)
        M = jnp.stack([jnp.stack([-beta + zero, zero]), jnp.stack([g + zero, -beta + zero])])
        return cls(M, sigma_w2, structure="anisotropic")

    @classmethod
    def graph(cls, graph: str, k: int, beta: ScalarLike, g: ScalarLike, sigma_w2: ScalarLike) -> "CoupledOU":
        r"""$k$ modalities coupled along a graph, $M = -\beta I + g A$ (`graph`: `"all_to_all"`, `"ring"`, `"chain"`,
        `"star"`; see `cd.coupling_matrix`). Raises past the graph's closed-form stability bound
        (`cd.stability_interval`). At $k = 2$ the all-to-all, chain and star graphs are eq (2)'s M."""
        from .graphs import coupling_matrix

        return cls(coupling_matrix(graph, k, beta, g), sigma_w2)

    @property
    def time_dependent(self) -> bool:
        """Whether $M$ is a callable $M(t)$."""
        return callable(self.M)

    def drift_matrix(self, t) -> KxK:
        """$M(t)$ (the constant $M$ when not time-dependent)."""
        return self.M(t) if self.time_dependent else self.M

    @property
    def k(self) -> int:
        """The number of modalities."""
        if self.time_dependent:
            return jax.eval_shape(self.M, 0.0).shape[0]
        return self.M.shape[0]

    @property
    def beta(self) -> Scalar:
        """$\\beta = -M_{00}$ (meaningful for the structured constructors)."""
        if isinstance(self.M, StructuredDrift):
            return self.M.beta
        return -self.drift_matrix(0.0)[0, 0]

    @property
    def g(self) -> Scalar:
        """The coupling $g$ (`M[1, 0]`; for the symmetric M also `M[0, 1]`); the schedule if time-dependent."""
        if self.k < 2:
            raise ValueError("`g` is defined only for k >= 2 modalities.")
        if isinstance(self.M, StructuredDrift):
            return self.M.g
        if self.time_dependent:
            return lambda t: self.M(t)[1, 0]
        return self.M[1, 0]

    def require_constant(self, what: str) -> None:
        """Raise a clear error where a closed form needs a constant M."""
        if self.time_dependent:
            raise ValueError(
                f"`{what}` needs a constant M (closed-form moments); this CoupledOU has a "
                f"time-dependent M(t). Use `moments`/`kappa` (ODE moments) or the samplers for schedules."
            )

    def stable(self):
        """Traced check that the forward process relaxes: every eigenvalue of M has a negative real part.

        The structured constructors' conditions ($\\beta > |g|$, $\\beta > 0$) for them, and
        Routh-Hurwitz on $-M$ for a general M (no eigen-decomposition: works under `jit`,
        `vmap` and `grad`). For a symmetric M(t) it checks $\\beta > \\sup_t |g(t)|$ where the
        schedule knows that supremum (`Schedule.sup_abs`; a `Sum` of schedules or a plain
        callable does not, and then only $\\beta > 0$ is checked); for the anisotropic M(t),
        $\\beta > 0$; nothing for a general callable M(t).
        """
        if self.time_dependent:
            if not isinstance(self.M, StructuredDrift):
                return jnp.asarray(True)
            sup = self.M.sup_abs_g() if self.structure == "symmetric" else None
            return self.beta > (0.0 if sup is None else sup)
        if self.structure == "symmetric":
            return self.beta > jnp.abs(self.M[0, 1])
        if self.structure == "anisotropic":
            return self.beta > 0
        return positive_stable(-Mat.of(self.M))

    def require_stable(self, what: str) -> None:
        """Raise where `what` needs a relaxing forward process and a concrete constant M has an
        eigenvalue with a non-negative real part (under `jit` the solvers' `unstable` result
        code reports it instead)."""
        M = None if self.time_dependent else concrete(self.M)
        if M is not None:
            # eigenvalues in NumPy: 16 us, where the traced Routh-Hurwitz of `stable()` costs ~4 ms of eager dispatch
            eig = np.linalg.eigvals(np.asarray(M, np.float64))
            if not np.all(eig.real < 0):
                raise ValueError(f"`{what}` needs a stable M (every eigenvalue with a negative real part, so that the forward "
                                 f"process relaxes to a stationary law); this M has eigenvalues {np.round(eig, 6).tolist()}.")


def _check_scalars(**kw) -> None:
    for name, v in kw.items():
        if v.ndim != 0:
            raise ValueError(f"`{name}` must be a scalar, got shape {v.shape}.")
        check_finite(v, name)


class StructuredDrift(eqx.Module):
    r"""$M(t) = [[-\beta, g(t)], [g(t), -\beta]]$ (symmetric) or $[[-\beta, 0], [g(t), -\beta]]$ (anisotropic)."""

    beta: Scalar
    g: Callable
    structure: str = eqx.field(static=True)

    def __init__(self, beta, g, structure):
        _check_scalars(beta=beta)
        b = concrete(beta)
        if b is not None and not b > 0:
            raise ValueError(f"`beta` must be > 0, got {float(b)}.")
        if structure not in ("symmetric", "anisotropic"):
            raise ValueError(f"`structure` must be 'symmetric' or 'anisotropic', got {structure!r}.")
        self.beta, self.g, self.structure = beta, g, structure

    def __call__(self, t):
        g = jnp.asarray(self.g(t))
        beta = self.beta.astype(jnp.result_type(self.beta, g))
        zero = jnp.zeros_like(beta + g)
        upper = g + zero if self.structure == "symmetric" else zero
        return jnp.stack([jnp.stack([-beta + zero, upper]), jnp.stack([g + zero, -beta + zero])])

    def sup_abs_g(self):
        r"""$\sup_t |g(t)|$ where the schedule knows it (`Schedule.sup_abs`), else None."""
        sup = getattr(self.g, "sup_abs", None)
        return None if sup is None else sup()

    @property
    def jump_ts(self):
        """Discontinuities of the schedule, if it declares them (for the ODE solver)."""
        return getattr(self.g, "jump_ts", None)
