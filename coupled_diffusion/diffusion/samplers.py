r"""DDPM and DDIM samplers for mode-shaped VP diffusion (Section 5.1-5.2, eq 97, 101, 102, 104).

The reverse steps are diffusers' `DDPMScheduler.step` ("fixed_small" variance, epsilon
prediction) and `DDIMScheduler.step` (with `eta`), written as pure functions of arrays. With
mode-shaped noise the stochastic part is drawn from the same `ModeNoise` law as the forward
noise: this is the paper's recipe of taking the usual step in the whitened coordinates
$y_m = m / \sqrt{\lambda_m}$ (eq 102) and mapping back, because the step's mean is linear in
$(z_t, \hat\varepsilon)$ and so is the same in any linear coordinates. At $g = 0$ the steps
equal diffusers' (tested to 1e-6).

`sample` runs a whole reverse trajectory as one `lax.scan` (jitted; any batch, which may be
sharded over devices), and can on request

- log the predicted clean state $\hat z_0$ (eq 97) and the state $z_t$ at chosen timesteps,
- inject noise into one mode at a chosen timestep (the intervention of eq 101),
- start from a given state at a given timestep, to continue cached states as clones (eq 104).

The network enters as `eps_fn(z, t)`, `z` of shape `(B, H, W, k)` and `t` integer `(B,)`;
`NNXEps(model)` wraps an NNX model as such a function (a PyTree, so jitting does not retrace).
"""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from .._checks import concrete
from .noise import ModeNoise, VPSchedule, per_sample, predict_x0


def _check_step(schedule: VPSchedule, z_t, eps_hat, t, t_prev, noise_draw):
    """The checks of the public steps: shapes always (they are static); the timesteps raise when
    concrete and raise an Equinox runtime error under `jit`. Returns `z_t`, tied to the traced check."""
    z_shape = jnp.shape(z_t)
    if len(z_shape) < 1:
        raise ValueError(f"`z_t` must be a batch of states (B, ...), got shape {z_shape}.")
    for name, x in (("eps_hat", eps_hat), ("noise_draw", noise_draw)):
        if x is not None and jnp.shape(x) != z_shape:
            raise ValueError(f"`{name}` must have the shape of `z_t`, {z_shape}, got {jnp.shape(x)}.")
    for name, x in (("t", t), ("t_prev", t_prev)):
        if jnp.ndim(x) > 1 or (jnp.ndim(x) == 1 and jnp.shape(x)[0] != z_shape[0]):
            raise ValueError(f"`{name}` must be a scalar or of shape (B,) = ({z_shape[0]},) like `z_t`'s batch, "
                             f"got shape {jnp.shape(x)}.")
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"`{name}` must hold integer timesteps, got dtype {jnp.result_type(x)}.")
    tv, pv = concrete(t), concrete(t_prev)
    T = schedule.T
    if tv is not None and not np.all((tv >= 0) & (tv < T)):
        raise ValueError(f"timestep `t` must lie in [0, T = {T}), got {np.unique(tv).tolist()[:8]}.")
    if pv is not None and not np.all(pv >= -1):
        raise ValueError(f"`t_prev` must be >= -1 (-1: the clean end), got {np.unique(pv).tolist()[:8]}.")
    if tv is not None and pv is not None and not np.all(pv < tv):
        raise ValueError(f"`t_prev` must be below `t` (a reverse step goes down), got t = {tv.tolist()} and t_prev = {pv.tolist()}.")
    if tv is None or pv is None:  # traced: the same conditions as a runtime error
        t, t_prev = jnp.asarray(t), jnp.asarray(t_prev)
        bad = jnp.any((t < 0) | (t >= T)) | jnp.any(t_prev < -1) | jnp.any(t_prev >= t)
        z_t = eqx.error_if(z_t, bad, f"a reverse step needs timesteps 0 <= t < T = {T} and -1 <= t_prev < t.")
    return z_t


def check_clip(clip) -> float | None:
    """`clip` as a float, or None; a `ValueError` unless it is None or a finite Python number > 0.

    The bound is static (it selects the compiled step), so a traced value is refused too.
    """
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, int | float | np.integer | np.floating) or not (np.isfinite(clip) and clip > 0):
        raise ValueError("`clip` must be None (no bound) or a finite number > 0 (x0-hat bounded to "
                         f"[-clip, clip]), got {clip!r}.")
    return float(clip)


def _check_eta(eta) -> None:
    e = concrete(eta)
    if e is None or not (e.ndim == 0 and e >= 0):
        got = "a traced value" if e is None else e.tolist()
        raise ValueError(f"`eta` must be a concrete scalar >= 0 (0: deterministic DDIM, 1: DDPM-like), got {got}.")


def ddpm_step(schedule: VPSchedule, z_t, eps_hat, t, t_prev, noise_draw, *, clip: float | None = None):
    r"""One ancestral DDPM step from timestep `t` to `t_prev` (`t_prev < 0`: to the clean end).

    `noise_draw` is a draw of the forward noise law (`ModeNoise.sample`); it is not used where
    `t == 0`. `clip` bounds $\hat z_0$ to `[-clip, clip]` (diffusers' `clip_sample`). `t`, `t_prev`
    are integer arrays of shape `(B,)` (or scalars) with `0 <= t < T` and `-1 <= t_prev < t`:
    a `ValueError` when they are concrete, an Equinox runtime error under `jit`. `eps_hat` and
    `noise_draw` must have `z_t`'s shape (a draw of one state is not broadcast over a batch).
    """
    z_t = _check_step(schedule, z_t, eps_hat, t, t_prev, noise_draw)
    return _ddpm_step(schedule, z_t, eps_hat, t, t_prev, noise_draw, check_clip(clip))


def _ddpm_step(schedule, z_t, eps_hat, t, t_prev, noise_draw, clip):
    t, t_prev = jnp.broadcast_to(t, z_t.shape[:1]), jnp.broadcast_to(t_prev, z_t.shape[:1])
    ab_t = per_sample(schedule.alphas_cumprod[t], z_t)
    ab_prev = per_sample(schedule.alpha_bar_prev(t_prev), z_t)
    cur_alpha = ab_t / ab_prev
    cur_beta = 1 - cur_alpha
    x0 = predict_x0(schedule, z_t, eps_hat, t)
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
    mean = (jnp.sqrt(ab_prev) * cur_beta / (1 - ab_t)) * x0 + (jnp.sqrt(cur_alpha) * (1 - ab_prev) / (1 - ab_t)) * z_t
    var = jnp.maximum((1 - ab_prev) / (1 - ab_t) * cur_beta, 1e-20)
    return mean + jnp.where(per_sample(t, z_t) > 0, jnp.sqrt(var), 0) * noise_draw


def ddim_step(schedule: VPSchedule, z_t, eps_hat, t, t_prev, noise_draw=None, *, eta: float = 0.0,
              clip: float | None = None):
    r"""One DDIM step (Song et al. 2020, eq 12) from `t` to `t_prev`; `eta = 0` is deterministic.

    With `eta > 0`, `noise_draw` (a draw of the forward noise law) scales by
    $\sigma_t = \eta \sqrt{(1 - \bar\alpha_{prev}) / (1 - \bar\alpha_t)\,(1 - \bar\alpha_t / \bar\alpha_{prev})}$.
    The timesteps and shapes are checked as in [`ddpm_step`][].
    """
    z_t = _check_step(schedule, z_t, eps_hat, t, t_prev, noise_draw)
    _check_eta(eta)
    if eta > 0 and noise_draw is None:
        raise ValueError("`eta > 0` needs a `noise_draw`.")
    return _ddim_step(schedule, z_t, eps_hat, t, t_prev, noise_draw, eta, check_clip(clip))


def _ddim_step(schedule, z_t, eps_hat, t, t_prev, noise_draw, eta, clip):
    t, t_prev = jnp.broadcast_to(t, z_t.shape[:1]), jnp.broadcast_to(t_prev, z_t.shape[:1])
    ab_t = per_sample(schedule.alphas_cumprod[t], z_t)
    ab_prev = per_sample(schedule.alpha_bar_prev(t_prev), z_t)
    x0 = predict_x0(schedule, z_t, eps_hat, t)
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * jnp.sqrt(var)
    out = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - std**2, 0.0)) * eps_hat
    return out + std * noise_draw if eta > 0 else out


def timesteps(T: int, num_steps: int | None = None) -> np.ndarray:
    """The decreasing timesteps of a `num_steps`-step sampler over a `T`-step schedule.

    diffusers' default "leading" spacing: `arange(num_steps) * (T // num_steps)`, reversed; all
    `T` steps when `num_steps` is None.
    """
    n = T if num_steps is None else num_steps
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"`num_steps` must be an integer in [1, T = {T}], got {num_steps!r}.")
    return (np.arange(n) * (T // n))[::-1].astype(np.int32)


class Intervention(eqx.Module):
    """Noise injected into one mode just before the step at timestep `t` (eq 101): `m <- m + sigma xi`.

    `mode` indexes the `ModeNoise` modes (for `ModeNoise.paired`: 0 = u, 1 = v). `t` and `sigma`
    may be JAX arrays: then one compiled sampler serves every value (a scan over `t_int`), and
    a `t` off the sampler's grid is an Equinox runtime error instead of a `ValueError`.
    """

    t: Any
    sigma: Any
    mode: int = eqx.field(static=True, default=1)


class SampleResult(eqx.Module):
    """A reverse trajectory's end state and its logs.

    **Attributes:**

    - `z0`: the final sample `(B, H, W, k)`.
    - `timesteps`: the sampler's timesteps, decreasing `(n,)`.
    - `log_t`: the logged timesteps `(L,)`, in the order given.
    - `x0_log`: predicted clean states eq (97) at `log_t`, `(L, B, H, W, k)` (empty if none).
    - `z_log`: the states `z_t` fed to the network at `log_t` (after any intervention there).
    """

    z0: Float[Array, "B H W k"]
    timesteps: Int[Array, " n"]
    log_t: Int[Array, " L"]
    x0_log: Float[Array, "L B H W k"]
    z_log: Float[Array, "L B H W k"]


class NNXEps(eqx.Module):
    """An NNX eps-prediction model as a pure PyTree callable `(z, t) -> eps` (split once, merged in the trace)."""

    graphdef: Any = eqx.field(static=True)
    state: Any

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state = nnx.split(model)

    def __call__(self, z, t):
        return nnx.merge(self.graphdef, self.state)(z, t)


@eqx.filter_jit
def sample(eps_fn, schedule: VPSchedule, noise: ModeNoise, key, z_start: Float[Array, "B H W k"], *,
           method: Literal["ddpm", "ddim"] = "ddim", num_steps: int | None = None, eta: float = 0.0,
           start_t: Int[Array, ""] | int | None = None, log_at: tuple[int, ...] = (),
           intervention: Intervention | None = None, clip: float | None = None) -> SampleResult:
    r"""Run the reverse process from `z_start` to a clean sample.

    **Arguments:**

    - `eps_fn`: `(z, t) -> eps_hat`; e.g. `NNXEps(model)`.
    - `schedule`, `noise`: the `VPSchedule` and the `ModeNoise` law the model was trained with.
    - `key`: PRNG key for the reverse noise (DDPM, DDIM with `eta > 0`) and any intervention.
    - `z_start`: the starting state; a draw of `noise.sample` for a fresh trajectory (the paper
        starts DDIM from mode-shaped noise, Section 5.1).
    - `method`: "ddpm" (ancestral, Protocol II) or "ddim" (Protocol I; deterministic at `eta = 0`).
    - `num_steps`: number of reverse steps over the `T`-step schedule (`timesteps`); all `T` if None.
    - `start_t`: start at this timestep (which must be on the sampler's grid) instead of the
        first: `z_start` is then the state at `start_t`, e.g. a cached `z_log` entry, and the
        earlier steps are skipped. May be traced, so one compiled sampler serves every
        start time (clones, eq 104).
    - `log_at`: timesteps (on the grid) at which to record $\hat z_0$ (eq 97) and $z_t$.
    - `intervention`: an `Intervention` (eq 101), applied when the trajectory reaches its `t`.
    - `clip`: bound $\hat z_0$ to `[-clip, clip]` in each step (None: no clipping).

    **Returns:** a [`SampleResult`][].
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"`method` must be 'ddpm' or 'ddim', got {method!r}.")
    if z_start.ndim < 2 or z_start.shape[-1] != noise.k:
        raise ValueError(f"`z_start` must be (B, ..., k) with k = {noise.k} channels, got shape {z_start.shape}.")
    _check_eta(eta)
    clip = check_clip(clip)
    if intervention is not None:
        sig = concrete(intervention.sigma)
        if not (0 <= intervention.mode < noise.k) or (sig is not None and not (sig.ndim == 0 and sig >= 0)):
            raise ValueError(f"`intervention` needs 0 <= mode < {noise.k} and a scalar sigma >= 0, got mode "
                             f"{intervention.mode}, sigma {intervention.sigma}.")
    ts = timesteps(schedule.T, num_steps)
    grid = {int(t): i for i, t in enumerate(ts)}
    given_t = [] if intervention is None or concrete(intervention.t) is None else [("intervention.t", intervention.t)]
    for name, tt in [("log_at", t) for t in log_at] + given_t:
        if int(tt) not in grid:
            raise ValueError(f"`{name}` timestep {tt} is not on the sampler's grid (T = {schedule.T}, "
                             f"num_steps = {len(ts)}: {ts[:4].tolist()} ... {ts[-2:].tolist()}).")
    slot = np.full(len(ts), -1, np.int32)
    for j, t in enumerate(log_at):
        slot[grid[int(t)]] = j
    t_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    B = z_start.shape[0]
    L = len(log_at)
    if start_t is None:
        start_idx = jnp.int32(0)
    else:
        st = jnp.asarray(start_t, jnp.int32)
        start_idx = jnp.argmax(jnp.asarray(ts) == st).astype(jnp.int32)
        start_idx = eqx.error_if(start_idx, jnp.all(jnp.asarray(ts) != st), "`start_t` is not on the sampler's grid.")
    if intervention is not None and not given_t:  # traced t: the same check, at run time
        on_grid = jnp.any(jnp.asarray(ts) == intervention.t)
        z_start = eqx.error_if(z_start, ~on_grid, "`intervention.t` is not on the sampler's grid.")
    bufs = (jnp.zeros((L,) + z_start.shape, z_start.dtype), jnp.zeros((L,) + z_start.shape, z_start.dtype))
    step_key, int_key = jax.random.split(key)

    def body(carry, inp):
        z, (x0_buf, z_buf) = carry
        i, t, tp, s = inp

        def active(z, x0_buf, z_buf):
            if intervention is not None:  # eq (101): m <- m + sigma xi in one mode, i.e. z += sigma xi U[:, m]
                xi = jax.random.normal(int_key, z.shape[:-1] + (1,), z.dtype)
                bump = intervention.sigma * xi * noise.basis[:, intervention.mode].astype(z.dtype)
                z = z + jnp.where(t == intervention.t, bump, 0)
            tb = jnp.full((B,), t, jnp.int32)
            eps_hat = eps_fn(z, tb).astype(z.dtype)
            if L:
                x0 = predict_x0(schedule, z, eps_hat, tb)
                x0_buf, z_buf = jax.lax.cond(s >= 0, lambda b: (b[0].at[s].set(x0), b[1].at[s].set(z)), lambda b: b,
                                             (x0_buf, z_buf))
            draw = noise.sample(jax.random.fold_in(step_key, i), z.shape, z.dtype) if (method == "ddpm" or eta > 0) else None
            # the grid was checked above, so the unchecked steps (no runtime check per step)
            if method == "ddpm":
                z = _ddpm_step(schedule, z, eps_hat, tb, tp, draw, clip)
            else:
                z = _ddim_step(schedule, z, eps_hat, tb, tp, draw, eta, clip)
            return z, x0_buf, z_buf

        z, x0_buf, z_buf = jax.lax.cond(i >= start_idx, active, lambda *a: a, z, x0_buf, z_buf)
        return (z, (x0_buf, z_buf)), None

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(t_prev), jnp.asarray(slot))
    (z, (x0_buf, z_buf)), _ = jax.lax.scan(body, (z_start, bufs), xs)
    return SampleResult(z, jnp.asarray(ts), jnp.asarray(np.asarray(log_at, np.int32).reshape(-1)), x0_buf, z_buf)


# ------------------------------------------------------------------------------------------------ guidance windows


def ou_times(schedule: VPSchedule) -> np.ndarray:
    r"""$s_n = -\frac12\log\bar\alpha_n$ for every timestep: the OU time at which the equivalent process
    $dZ = -Z\,ds + \sqrt2\,dW$ has the schedule's signal level (`VPScore`)."""
    return np.asarray(schedule.ou_time(np.arange(schedule.T)), np.float64)


def guidance_weights(schedule: VPSchedule, scale: float, window=None) -> np.ndarray:
    r"""Per-timestep classifier-free guidance weights $w_n$ for [`GuidedEps`][], `(T,)`:
    $w_n = 1 + $ `scale` where the timestep's OU time $s_n$ lies in `window = (s_lo, s_hi)`, and 1
    (plain conditional sampling) elsewhere; `window=None` applies `scale` at every timestep (constant guidance)."""
    s = ou_times(schedule)
    if not (np.isscalar(scale) and np.isfinite(scale) and scale >= 0):
        raise ValueError(f"`scale` must be a finite number >= 0 (the extra guidance, w = 1 + scale), got {scale!r}.")
    if window is None:
        inside = np.ones_like(s, bool)
    else:
        lo, hi = (float(v) for v in window)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi):
            raise ValueError(f"`window` must be OU times (s_lo, s_hi) with 0 <= s_lo < s_hi, got {window!r}.")
        inside = (s >= lo) & (s <= hi)
    return np.where(inside, 1.0 + scale, 1.0).astype(np.float32)


def guidance_strength(schedule: VPSchedule, weights, num_steps: int | None = None) -> float:
    r"""The total extra guidance a sampler applies, $\sum_i (w_{t_i} - 1)(s_{t_i} - s_{t_{i+1}})$ over its steps
    $t_0 > t_1 > \dots$ ($s_{-1} = 0$): the OU-time integral of the extra weight, what "the same total
    strength" compares."""
    ts = timesteps(schedule.T, num_steps)
    s = ou_times(schedule)
    s_next = np.concatenate([s[ts[1:]], [0.0]])
    return float(np.sum((np.asarray(weights, np.float64)[ts] - 1.0) * (s[ts] - s_next)))


def matched_constant_scale(schedule: VPSchedule, scale: float, window, num_steps: int | None = None) -> float:
    """The constant extra scale whose [`guidance_strength`][] equals that of `scale` applied in `window`."""
    pulse = guidance_strength(schedule, guidance_weights(schedule, scale, window), num_steps)
    unit = guidance_strength(schedule, guidance_weights(schedule, 1.0), num_steps)
    return pulse / unit


class GuidedEps(eqx.Module):
    r"""Classifier-free guidance with a per-timestep weight (a guidance window, or pulse), as an `eps_fn` for
    [`sample`][]: $\hat\varepsilon = \hat\varepsilon_\varnothing + w_t(\hat\varepsilon_y - \hat\varepsilon_\varnothing)$,
    the conditional and unconditional predictions of one class-conditional model `model(z, t, y)` (a
    [`DiT`][] with label dropout, or any callable such as [`GaussianMixtureEps`][]; its null class is `null`,
    default `model.num_classes`) evaluated in one batch.
    `weights`: `(T,)` from [`guidance_weights`][] ($w = 1$: plain conditional sampling); `y`: the labels `(B,)`.
    """

    graphdef: Any = eqx.field(static=True)
    state: Any
    y: Array
    weights: Array
    null: int = eqx.field(static=True)

    def __init__(self, model, y, weights, *, null: int | None = None):
        null = getattr(model, "num_classes", None) if null is None else null
        if null is None:
            raise ValueError("`null` (the unconditional class index) is needed for a model without `num_classes`.")
        # an NNX module travels as (graphdef, state); any other model (an equinox module, a function) as itself
        self.graphdef, self.state = nnx.split(model) if isinstance(model, nnx.Module) else (None, model)
        self.y = jnp.asarray(y, jnp.int32)
        self.weights = jnp.asarray(weights, jnp.float32)
        self.null = int(null)

    def __call__(self, z, t):
        model = self.state if self.graphdef is None else nnx.merge(self.graphdef, self.state)
        B = z.shape[0]
        out = model(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                    jnp.concatenate([self.y, jnp.full((B,), self.null, jnp.int32)]))[..., : z.shape[-1]]
        cond, uncond = out[:B], out[B:]
        w = self.weights[t].astype(z.dtype).reshape((B,) + (1,) * (z.ndim - 1))
        return uncond + w * (cond - uncond)
