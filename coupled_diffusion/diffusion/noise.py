r"""Discrete variance-preserving diffusion with mode-shaped noise (Section 5, eq 90-97).

A `VPSchedule` holds the discrete beta schedule of a `T`-step VP diffusion and its derived
arrays (the same quantities, with the same conventions, as diffusers' `DDPMScheduler`):

$$\alpha_t = 1 - \beta_t, \qquad \bar\alpha_t = \prod_{s \le t} \alpha_s, \qquad
z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\,\varepsilon \quad \text{(eq 94)}.$$

A `ModeNoise` is the law of $\varepsilon$: Gaussian, independent over pixels, with a
$k \times k$ covariance $\Sigma$ across the $k$ channels (channels-last arrays, `(..., k)`).
It is stored by its eigen-decomposition $\Sigma = U \operatorname{diag}(\lambda) U^\top$: the
columns of $U$ are the *modes*. For the paper's two channels (eq 91-93),
`ModeNoise.paired(g)` has $u = (x_A + x_B)/\sqrt2$, $v = (x_A - x_B)/\sqrt2$ and
$\lambda = (1 - g, 1 + g)$, i.e. unit channel variances and $\mathrm{Cov}(\varepsilon_A,
\varepsilon_B) = -g$; $g = 0$ is standard isotropic noise. `whiten` maps to the coordinates
$y_m = m / \sqrt{\lambda_m}$ of eq (102), where the noise is standard.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._checks import concrete

TERMINAL_SIGNAL_WARN = 0.1  # a VP schedule leaving more of the data at its last step warns when built


def _linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal (2021), eq 17; the same discretisation as diffusers' "squaredcos_cap_v2"
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], np.float64)


class VPSchedule(eqx.Module):
    r"""The discrete VP schedule: `betas`, `alphas`, `alphas_cumprod` ($\bar\alpha_t$), all `(T,)` float32.

    Build it with `VPSchedule.linear(T)` (the paper's) or `VPSchedule.cosine(T)`. Timesteps index
    from 0 to `T - 1`, as in diffusers.

    The linear schedule's default end points are DDPM's `(1e-4, 0.02)` scaled by `1000 / T`, the
    rule of Nichol & Dhariwal's (2021) code: at `T = 1000` it is diffusers' `DDPMScheduler`
    exactly, and at any `T` it ends near pure noise ($\bar\alpha_{T-1} \approx 4 \times 10^{-5}$).
    The unscaled `(1e-4, 0.02)` at `T = 200` would end at $\bar\alpha_{T-1} = 0.13$, i.e. 37% of
    the signal left where the sampler starts from pure noise: pass `beta_start`, `beta_end`
    explicitly to get it anyway, and see `terminal_signal`.
    """

    betas: Float[Array, " T"]
    alphas: Float[Array, " T"]
    alphas_cumprod: Float[Array, " T"]
    kind: str = eqx.field(static=True, default="custom")

    def __init__(self, betas, kind: str = "custom"):
        b = np.asarray(betas, np.float64)
        if b.ndim != 1 or b.size < 2:
            raise ValueError(f"`betas` must be a 1-D array of at least 2 steps, got shape {b.shape}.")
        if not np.all((b > 0) & (b < 1)):
            raise ValueError(f"`betas` must lie in (0, 1); got min {b.min()}, max {b.max()}.")
        # float32 arrays computed exactly as diffusers does (cumprod of float32 alphas)
        b32 = b.astype(np.float32)
        a32 = (1.0 - b32).astype(np.float32)
        self.betas = jnp.asarray(b32)
        self.alphas = jnp.asarray(a32)
        cumprod = np.cumprod(a32, dtype=np.float32)
        self.alphas_cumprod = jnp.asarray(cumprod)
        self.kind = kind
        signal = float(np.sqrt(cumprod[-1]))
        if signal > TERMINAL_SIGNAL_WARN:
            warnings.warn(f"this VP schedule leaves terminal_signal = sqrt(alpha_bar[T-1]) = {signal:.3g} of the data at its last "
                          f"step (more than {TERMINAL_SIGNAL_WARN}), but every sampler starts from pure noise there: samples "
                          "will be off. Raise `beta_end` or `T`, or use the default end points (scaled by 1000 / T).",
                          UserWarning, stacklevel=3)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float | None = None, beta_end: float | None = None) -> VPSchedule:
        """Betas linear from `beta_start` to `beta_end`; by default `(1e-4, 0.02) * 1000 / T` (beta capped at 0.999)."""
        _check_T(T)
        scale = 1000 / T
        beta_start = 1e-4 * scale if beta_start is None else beta_start
        beta_end = min(0.02 * scale, 0.999) if beta_end is None else beta_end
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < `beta_start` < `beta_end` < 1, got {beta_start} and {beta_end}.")
        return cls(_linear_betas(T, beta_start, beta_end), kind="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> VPSchedule:
        _check_T(T)
        if not s > 0:
            raise ValueError(f"the cosine offset `s` must be positive, got {s}.")
        return cls(_cosine_betas(T, s), kind="cosine")

    @classmethod
    def named(cls, kind: Literal["linear", "cosine"], T: int) -> VPSchedule:
        if kind == "linear":
            return cls.linear(T)
        if kind == "cosine":
            return cls.cosine(T)
        raise ValueError(f"`schedule` must be 'linear' or 'cosine', got {kind!r}.")

    @property
    def terminal_signal(self) -> float:
        r"""$\sqrt{\bar\alpha_{T-1}}$: the fraction of the data left at the last step.

        Every sampler starts from pure noise at the last step, i.e. assumes this is 0. A schedule
        whose terminal signal exceeds `TERMINAL_SIGNAL_WARN` (0.1) warns when it is built:
        DDPM's `(1e-4, 0.02)` unscaled at T = 200 leaves 0.37, and samples from a model trained
        on it were stroke textures, not digits.
        """
        return float(np.sqrt(np.asarray(self.alphas_cumprod)[-1]))

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    def ou_time(self, t):
        r"""$s_t = -\frac12\log\bar\alpha_t$, the OU time of timestep(s) `t` (integer or fractional, interpolated
        linearly in $\log\bar\alpha$): the time at which the equivalent process $dZ = -Z\,ds + \sqrt2\,dW$ has the
        schedule's signal level, since $\bar\alpha_t = e^{-2s}$ makes the VP forward law that OU process."""
        log_ab = jnp.log(self.alphas_cumprod.astype(jnp.result_type(float)))  # float64 under jax_enable_x64
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return -0.5 * log_ab[t]
        return -0.5 * jnp.interp(t, jnp.arange(log_ab.shape[0], dtype=log_ab.dtype), log_ab)

    def timestep(self, s, *, discrete: bool = False, outside: Literal["clip", "nan"] = "clip"):
        r"""The timestep of OU time(s) `s`, the inverse of [`VPSchedule.ou_time`][]: fractional (linear in
        $\log\bar\alpha$), or with `discrete=True` the nearest integer. Outside the schedule's range
        $[s_0, s_{T-1}]$: clipped to it (`outside="clip"`) or NaN (`"nan"`, fractional only)."""
        log_ab = jnp.log(self.alphas_cumprod.astype(jnp.result_type(float)))  # decreasing in t
        T = log_ab.shape[0]
        x = -2.0 * jnp.asarray(s, log_ab.dtype)
        n = jnp.interp(x, log_ab[::-1], jnp.arange(T, dtype=log_ab.dtype)[::-1])
        if discrete:
            return jnp.clip(jnp.rint(n), 0, T - 1).astype(jnp.int32)
        if outside == "nan":
            return jnp.where((x >= log_ab[-1]) & (x <= log_ab[0]), n, jnp.nan)
        return n

    def alpha_bar_prev(self, t_prev: Int[Array, ...]) -> Float[Array, ...]:
        r"""$\bar\alpha$ at `t_prev`, and 1 where `t_prev < 0` (the clean end, diffusers' `set_alpha_to_one`)."""
        return jnp.where(t_prev >= 0, self.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)

    def posterior_variance(self) -> Float[Array, " T"]:
        r"""$\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)$ (DDPM's "fixed_small"; 0 at t = 0)."""
        ab = self.alphas_cumprod
        prev = jnp.concatenate([jnp.ones((1,), ab.dtype), ab[:-1]])
        # beta_t as 1 - abar_t / abar_{t-1}, as in diffusers and `ddpm_step` (equal in exact arithmetic)
        return (1 - prev) / (1 - ab) * (1 - ab / prev)


def _check_T(T) -> None:
    if not isinstance(T, (int, np.integer)) or T < 2:
        raise ValueError(f"the number of diffusion steps `T` must be an integer >= 2, got {T!r}.")


class ModeNoise(eqx.Module):
    r"""Gaussian noise with channel covariance $\Sigma = U \operatorname{diag}(\lambda) U^\top$ (eq 92-93).

    **Arguments:**

    - `basis`: `(k, k)` orthogonal; column `m` is mode `m` in channel coordinates.
    - `variances`: `(k,)` positive mode variances $\lambda_m$.

    Constructors: `ModeNoise.paired(g)` (the paper's two channels), `ModeNoise.isotropic(k)`,
    `ModeNoise.from_covariance(cov)` (any symmetric positive definite `k x k`).
    """

    basis: Float[Array, "k k"]
    variances: Float[Array, " k"]

    def __init__(self, basis, variances):
        basis, variances = jnp.asarray(basis, jnp.float32), jnp.asarray(variances, jnp.float32)
        k = variances.shape[-1] if variances.ndim else 0
        if variances.ndim != 1 or basis.shape != (k, k) or k == 0:
            raise ValueError(f"`basis` must be k x k and `variances` (k,), got shapes {basis.shape} and {variances.shape}.")
        v = concrete(variances)
        if v is not None and not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"mode `variances` must be positive and finite, got {v.tolist()}; for `paired(g)` "
                             "this means |g| < 1.")
        u = concrete(basis)
        if u is not None and not np.allclose(u.T @ u, np.eye(k), atol=1e-5):
            raise ValueError("`basis` must be orthogonal (its columns are the noise eigenmodes).")
        self.basis, self.variances = basis, variances

    @classmethod
    def paired(cls, g) -> ModeNoise:
        r"""Two channels with $\mathrm{Var}\,\varepsilon_{A,B} = 1$, $\mathrm{Cov}(\varepsilon_A, \varepsilon_B) = -g$ (eq 93).

        Modes $u = (x_A + x_B)/\sqrt2$ with variance $1 - g$ and $v = (x_A - x_B)/\sqrt2$ with
        variance $1 + g$ (eq 91-92). `g` must satisfy $|g| < 1$ (else the covariance is singular
        or indefinite); under `jit` a traced `g` outside that range is reported by an
        `equinox` runtime error.
        """
        gv = concrete(g)
        if gv is not None:
            if gv.ndim != 0 or not np.isfinite(gv) or abs(float(gv)) >= 1:
                raise ValueError(f"the coupling `g` must be a scalar with |g| < 1 (eq 92 needs 1 - g > 0 and 1 + g > 0), "
                                 f"got {gv.tolist()}.")
        else:
            g = eqx.error_if(g, jnp.abs(g) >= 1, "the coupling `g` must satisfy |g| < 1 (eq 92).")
        r = 1 / math.sqrt(2)
        g = jnp.asarray(g, jnp.float32)
        return cls(jnp.array([[r, r], [r, -r]], jnp.float32), jnp.stack([1 - g, 1 + g]))

    @classmethod
    def isotropic(cls, k: int = 2) -> ModeNoise:
        return cls(jnp.eye(k, dtype=jnp.float32), jnp.ones((k,), jnp.float32))

    @classmethod
    def from_covariance(cls, cov) -> ModeNoise:
        c = np.asarray(cov, np.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.allclose(c, c.T):
            raise ValueError(f"`cov` must be a symmetric k x k matrix, got shape {c.shape}.")
        lam, u = np.linalg.eigh(c)
        if not np.all(lam > 0):
            raise ValueError(f"`cov` must be positive definite; its eigenvalues are {lam.tolist()}.")
        return cls(u, lam)

    @property
    def k(self) -> int:
        return self.variances.shape[0]

    @property
    def covariance(self) -> Float[Array, "k k"]:
        return (self.basis * self.variances) @ self.basis.T

    def to_modes(self, x: Float[Array, "... k"]) -> Float[Array, "... k"]:
        """Channel coordinates -> mode coordinates (for `paired`: `(u, v)`, eq 91)."""
        return x @ self.basis.astype(x.dtype)

    def from_modes(self, m: Float[Array, "... k"]) -> Float[Array, "... k"]:
        return m @ self.basis.T.astype(m.dtype)

    def whiten(self, x: Float[Array, "... k"]) -> Float[Array, "... k"]:
        r"""Channel coordinates -> $y_m = m / \sqrt{\lambda_m}$ (eq 102), where this noise is standard."""
        return self.to_modes(x) * jax.lax.rsqrt(self.variances).astype(x.dtype)

    def color(self, y: Float[Array, "... k"]) -> Float[Array, "... k"]:
        """The inverse of `whiten`: maps standard noise to this law."""
        return self.from_modes(y * jnp.sqrt(self.variances).astype(y.dtype))

    def sample(self, key, shape: tuple[int, ...], dtype=jnp.float32) -> Float[Array, ...]:
        """A draw of shape `shape` (last axis the `k` channels)."""
        if shape[-1] != self.k:
            raise ValueError(f"the last axis of `shape` must be the {self.k} channels, got {shape}.")
        return self.color(jax.random.normal(key, shape, dtype))


def per_sample(a: Float[Array, " B"], x: Float[Array, "B ..."]) -> Float[Array, "B 1 ..."]:
    """A per-sample `(B,)` array shaped to broadcast against `x` `(B, ...)`, in `x`'s dtype."""
    return a.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def add_noise(schedule: VPSchedule, z0, eps, t) -> Float[Array, "B ..."]:
    r"""Forward noising eq (94): $z_t = \sqrt{\bar\alpha_t} z_0 + \sqrt{1 - \bar\alpha_t}\,\varepsilon$, `t` of shape `(B,)`."""
    ab = per_sample(schedule.alphas_cumprod[t], z0)
    return jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * eps


def predict_x0(schedule: VPSchedule, z_t, eps_hat, t) -> Float[Array, "B ..."]:
    r"""The predicted clean state, eq (97): $\hat z_0 = (z_t - \sqrt{1 - \bar\alpha_t}\,\hat\varepsilon) / \sqrt{\bar\alpha_t}$."""
    ab = per_sample(schedule.alphas_cumprod[t], z_t)
    return (z_t - jnp.sqrt(1 - ab) * eps_hat) / jnp.sqrt(ab)


def eps_loss(eps_hat, eps, noise: ModeNoise | None = None, *, whitened: bool = False) -> Float[Array, ""]:
    r"""The eps-prediction loss eq (96), averaged over all entries.

    With `whitened=True` (and a `noise`), the error is measured in the whitened coordinates
    $y$ of eq (102), i.e. mode $m$'s squared error is divided by $\lambda_m$: this removes the
    over-weighting of the high-variance $v$ mode that the paper notes under eq (96).
    """
    err = (eps_hat.astype(jnp.float32) - eps.astype(jnp.float32))
    if whitened:
        if noise is None:
            raise ValueError("`whitened=True` needs the `noise` law.")
        err = noise.whiten(err)
    return jnp.mean(err**2)
