r"""The MNIST synchronization experiments of Section 5 on a trained two-channel model.

Protocol I (Section 5.1), deterministic diagnostics: [`protocol1`][] runs DDIM ($\eta = 0$) from
mode-shaped noise, logs $\hat z_0$ (eq 97) at every reverse step, and measures the
cosine-to-final curves of u and v (eq 98), their crossing times and the synchronization gap
(eq 99-100), and the ghosting index (eq 107-108); [`intervention_effect`][] injects noise into
v alone at $t_{int}$ (eq 101) and measures how much of it survives to the output, and
[`intervention_curve`][] does so over a range of $t_{int}$ with one compiled sampler.

Protocol II (Section 5.2), cloning: [`fit_mode_classifiers`][] trains $C_u$ and $C_v$ on the
mode images of eq (103), and [`protocol2`][] measures the clone agreement $\phi_m(t)$ (eq 104),
its excess over independent samples (eq 105) with Wilson intervals, and $t^{spec}_m$ (eq 106).

The model enters as `eps_fn(z, t)` (e.g. `NNXEps(result.ema_model)`) with the `VPSchedule` and
`ModeNoise` it was trained with; [`run_eps`][] builds the three from a training run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..diffusion.build import build_noise
from ..diffusion.noise import ModeNoise, VPSchedule
from ..diffusion.samplers import Intervention, NNXEps, sample, timesteps
from ..diffusion.sync import (
    Crossing,
    check_level,
    cosine_to_final,
    excess_agreement,
    ghosting_index,
    rms_change,
    speciation_crossing,
    sync_gaps,
    wilson,
)
from ..models.sharding import data_mesh, replicate, shard_batch

TAUS = (0.90, 0.95, 0.98)  # the paper's thresholds (Table 1)
# the samplers bound x0-hat to the data's range [-1, 1] in each step, as diffusers' DDPM and DDIM
# schedulers do by default (`clip_sample=True`): unbounded, a two-class model of 1200 steps gave 17%
# recognisable DDPM samples and 4% DDIM ones, against 95% and 82% bounded (README)
CLIP = 1.0


def run_eps(result, *, ema: bool = True):
    """`(eps_fn, schedule, noise)` of a training run (`TrainResult` or `load_run`); the EMA weights by default.

    With several devices the weights are replicated on all of them, as the protocols split
    their batches over the devices (`_spread`).
    """
    schedule, noise = build_noise(result.config.noise)
    model = result.ema_model if ema else result.model
    if jax.device_count() > 1:
        replicate(model, data_mesh())
    return NNXEps(model), schedule, noise


def _spread(z):
    """The batch split over all devices (data parallel) when there are several and they divide it; else `z`.

    The samplers' draws do not depend on the placement (JAX's partitionable threefry), so the
    numbers are those of one device, to float rounding (tested on 4 fake devices).
    """
    count = jax.device_count()
    if count == 1 or z.shape[0] % count:
        return z
    return shard_batch(z, data_mesh())


def _start(noise: ModeNoise, n: int, seed: int):
    if not (isinstance(n, int | np.integer) and n >= 1):
        raise ValueError(f"`n` (the evaluation batch) must be a positive integer, got {n!r}.")
    key_start, key_run = jax.random.split(jax.random.key(seed))
    return _spread(noise.sample(key_start, (int(n), 28, 28, noise.k))), key_run


def protocol1(eps_fn, schedule: VPSchedule, noise: ModeNoise, *, n: int = 16, num_steps: int | None = None, seed: int = 0,
              taus=TAUS, clip: float | None = CLIP) -> dict:
    r"""Protocol I on one model: DDIM from `n` draws of the mode-shaped noise, every step logged.

    The steps bound $\hat z_0$ to `[-clip, clip]` (diffusers' default; None: unbounded); the logged
    $\hat z_0$ is eq (97)'s, before the bound.

    **Returns:** a dict of NumPy arrays and [`Crossing`][]s:

    - `t`: the logged timesteps, decreasing (the reverse order); `cos_u`, `cos_v`: eq (98) at each;
    - `gaps`: `{tau: {"gap", "t_u", "t_v"}}` (eq 99-100; the gap is NaN unless both modes cross);
    - `c_u`, `c_a`, `c_b`, `ghosting`: eq (107-108), batch means;
    - `trajectory`: $\hat z_0$ of the first sample at every logged step, `(L, 28, 28, 2)`, for Figure 8;
    - `final`: the `n` final samples `(n, 28, 28, 2)`.
    """
    if noise.k != 2:
        raise ValueError(f"Protocol I needs the paired two-channel noise (k = 2), got k = {noise.k}.")
    z_start, key = _start(noise, n, seed)
    ts = timesteps(schedule.T, num_steps)
    out = sample(eps_fn, schedule, noise, key, z_start, method="ddim", eta=0.0, num_steps=len(ts), log_at=tuple(int(t) for t in ts),
                 clip=clip)
    x0 = np.asarray(out.x0_log, np.float64)  # (L, B, H, W, 2), logged in reverse order (decreasing t)
    modes = np.asarray(noise.to_modes(jnp.asarray(x0)), np.float64)
    t = np.asarray(out.log_t)
    cos_u, cos_v = cosine_to_final(modes[..., 0]), cosine_to_final(modes[..., 1])
    c_a, c_b = cosine_to_final(x0[..., 0]), cosine_to_final(x0[..., 1])
    return {"t": t, "cos_u": cos_u, "cos_v": cos_v, "gaps": sync_gaps(t, cos_u, cos_v, taus),
            "c_u": cos_u, "c_a": c_a, "c_b": c_b, "ghosting": ghosting_index(cos_u, c_a, c_b),
            "trajectory": x0[:, 0].astype(np.float32), "final": np.asarray(out.z0)}


def _on_grid(times, ts, what: str) -> list[int]:
    """`times` as integers, each one of the sampler's timesteps `ts`; else a ValueError starting with `what`."""
    raw = np.atleast_1d(np.asarray(times, np.float64))
    grid = set(ts.tolist())
    off = [float(r) for r in raw if r != int(r) or int(r) not in grid]
    if raw.size == 0 or off:
        raise ValueError(f"{what} of timesteps on the sampler's grid ({ts[:3].tolist()} ... {ts[-2:].tolist()}), "
                         f"got {off or times!r}.")
    return [int(r) for r in raw]


def _final_modes(eps_fn, schedule, noise, key, z_start, num_steps, clip, intervention=None):
    z0 = sample(eps_fn, schedule, noise, key, z_start, method="ddim", eta=0.0, num_steps=num_steps, intervention=intervention,
                clip=clip).z0
    return np.asarray(noise.to_modes(z0), np.float64)


def intervention_effect(eps_fn, schedule: VPSchedule, noise: ModeNoise, *, t_int: int, sigma: float = 0.25, n: int = 16,
                        num_steps: int | None = None, seed: int = 0, mode: int = 1, clip: float | None = CLIP) -> dict:
    r"""The intervention of eq (101): noise of scale `sigma` added to one mode (`mode = 1`: v) at `t_int`,
    then deterministic DDIM on, from the same initial noise as an unperturbed run.

    **Returns:** `{"rms_u", "rms_v"}`, the RMS change of the final u and v images (mode coordinates,
    eq 91), and `{"t_int", "sigma"}`. The paper: $t_{int} = 260$ of $T = 500$, $\sigma = 0.25$ (Figure 9).
    `clip` as in [`protocol1`][].
    """
    return intervention_curve(eps_fn, schedule, noise, t_ints=[t_int], sigma=sigma, n=n, num_steps=num_steps, seed=seed,
                              mode=mode, clip=clip)[0]


def intervention_curve(eps_fn, schedule: VPSchedule, noise: ModeNoise, *, t_ints, sigma: float = 0.25, n: int = 16,
                       num_steps: int | None = None, seed: int = 0, mode: int = 1, clip: float | None = CLIP,
                       progress=None) -> list[dict]:
    r"""[`intervention_effect`][] at each of `t_ints` (timesteps on the sampler's grid), one compiled sampler for all.

    The window where u is already stable and v is not shows as the range of $t_{int}$ where
    the v perturbation survives (large RMS $\Delta v$) while u is barely moved.
    `progress(i, total)` is called after each.
    """
    ts = timesteps(schedule.T, num_steps)
    t_ints = _on_grid(t_ints, ts, "`t_ints` must be a non-empty list")
    if not (float(sigma) >= 0):
        raise ValueError(f"`sigma` must be >= 0, got {sigma!r}.")
    z_start, key = _start(noise, n, seed)
    base = _final_modes(eps_fn, schedule, noise, key, z_start, len(ts), clip)
    out = []
    for i, t in enumerate(t_ints):
        hit = Intervention(jnp.int32(t), jnp.float32(sigma), mode)  # traced t and sigma: compiled once
        m = _final_modes(eps_fn, schedule, noise, key, z_start, len(ts), clip, hit)
        out.append({"t_int": t, "sigma": float(sigma), "rms_u": rms_change(m[..., 0], base[..., 0]),
                    "rms_v": rms_change(m[..., 1], base[..., 1])})
        if progress is not None:
            progress(i + 1, len(t_ints))
    return out


# ------------------------------------------------------------------------------------------------ Protocol II


def mode_images(z):
    r"""The swap-invariant images of eq (103) from pairs `z` `(..., 28, 28, 2)` in the model's [-1, 1] units:
    $u_{img} = (x_A + x_B)/2$ and $v_{img} = (x_A - x_B)/\sqrt2$ with pixels mapped to [0, 1] first."""
    x = (jnp.asarray(z) + 1) / 2
    return (x[..., 0] + x[..., 1]) / 2, (x[..., 0] - x[..., 1]) / np.sqrt(2)


class ModeClassifier(nnx.Module):
    """A small CNN from a `(B, 28, 28)` mode image to class logits; `symmetric=True` uses the
    sign-symmetrised logits `(f(v) + f(-v)) / 2` (the paper's C_v, eq 103), which cannot tell v from -v."""

    def __init__(self, n_classes: int = 2, *, symmetric: bool = False, width: int = 16, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.l1 = nnx.Linear(7 * 7 * 2 * width, 64, rngs=rngs)
        self.out = nnx.Linear(64, n_classes, rngs=rngs)
        self.symmetric = symmetric

    def _logits(self, x):
        h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x[..., None]))))
        return self.out(jax.nn.relu(self.l1(h.reshape(h.shape[0], -1))))

    def __call__(self, x):
        return (self._logits(x) + self._logits(-x)) / 2 if self.symmetric else self._logits(x)


def _class_index(data, classes):
    labels = np.asarray(data.labels)
    if classes is None:
        classes = tuple(sorted(set(labels.tolist())))
    classes = tuple(int(c) for c in classes)
    if len(classes) < 2 or not set(labels.tolist()) <= set(classes):
        raise ValueError(f"`classes` must list every label of the data ({sorted(set(labels.tolist()))}), at least two, "
                         f"got {classes}.")
    return jnp.asarray(np.searchsorted(np.asarray(classes), labels), jnp.int32), classes


def fit_mode_classifiers(train, test, *, classes=None, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                         seed: int = 0) -> dict:
    r"""Train $C_u$ on $u_{img}$ and $C_v$ (sign-symmetrised) on $v_{img}$ (eq 103) of MAIN pairs, with Adam.

    `train`, `test`: `PairedMNIST` MAIN data of the chosen classes (e.g. digits 0 and 1, Section
    5.2), in [-1, 1] (`symmetric=True`). **Returns:** `{"c_u", "c_v", "classes", "test_accuracy_u",
    "test_accuracy_v"}`, the accuracies on every pair of `test` (each swapped at random, as in training).
    """
    for name, d in (("train", train), ("test", test)):
        if d.pairing != "main" or not d.symmetric:
            raise ValueError(f"`{name}` must be MAIN pairs in [-1, 1] (pairing='main', symmetric=True).")
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch_size, int) and 2 <= batch_size <= len(train)):
        raise ValueError(f"need `steps` >= 1 and 2 <= `batch_size` <= {len(train)}, got {steps!r} and {batch_size!r}.")
    y_train, classes = _class_index(train, classes)
    y_test, _ = _class_index(test, classes)
    models = {"c_u": ModeClassifier(len(classes), rngs=nnx.Rngs(seed)),
              "c_v": ModeClassifier(len(classes), symmetric=True, rngs=nnx.Rngs(seed + 1))}
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    out = {"classes": classes}
    for which, (name, model) in enumerate(models.items()):
        graphdef, params = nnx.split(model)

        def step(i, carry, graphdef=graphdef, which=which):
            params, opt = carry
            key = jax.random.fold_in(jax.random.key(seed + 10 + which), i)
            ka, ks = jax.random.split(key)
            a = jax.random.randint(ka, (batch_size,), 0, len(train))
            img = mode_images(train.batch(a, a, ks))[which]
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                nnx.merge(graphdef, p)(img), y_train[a]).mean())(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        params, _ = jax.jit(lambda p, o, step=step: jax.lax.fori_loop(0, steps, step, (p, o)))(params, tx.init(params))
        model = nnx.merge(graphdef, params)
        idx = jnp.arange(len(test))
        pred = _predict(model, mode_images(test.batch(idx, idx, jax.random.key(seed + 99)))[which])
        out[name], out[f"test_accuracy_{name[-1]}"] = model, float(np.mean(pred == np.asarray(y_test)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _labels(graphdef, params, x):
    return jnp.argmax(nnx.merge(graphdef, params)(x), -1)


def _predict(model, img, chunk: int = 4096) -> np.ndarray:
    graphdef, params = nnx.split(model)  # the graph is hashable: one compilation per classifier and batch shape
    return np.concatenate([np.asarray(_labels(graphdef, params, img[i:i + chunk])) for i in range(0, img.shape[0], chunk)])


def classify_modes(classifiers: dict, z) -> tuple[np.ndarray, np.ndarray]:
    """`(y_u, y_v)`: the class indices that `C_u` and `C_v` give the pairs `z` `(B, 28, 28, 2)` in [-1, 1]."""
    u, v = mode_images(z)
    return _predict(classifiers["c_u"], u), _predict(classifiers["c_v"], v)


def protocol2(eps_fn, schedule: VPSchedule, noise: ModeNoise, classifiers: dict, *, scan_t, n: int = 128, repeats: int = 1,
              num_steps: int | None = None, seed: int = 0, phi_star: float = 0.55, clip: float | None = CLIP,
              progress=None) -> dict:
    r"""Protocol II (Section 5.2): cloning agreement of u and v against the reverse time, and $t^{spec}_{u,v}$.

    For each of `repeats` master DDPM trajectories (batch `n`, eq 102's rescaled steps), the states at
    the scan times `scan_t` (timesteps on the sampler's grid) are cached, and from each two clones run
    to $t = 0$ with independent noise; $C_u$ and $C_v$ (from [`fit_mode_classifiers`][]) label both.
    $\phi_m(t)$ (eq 104) pools the agreeing pairs over repeats and batch, with 95% Wilson intervals;
    $\phi^{indep}_m$ comes from as many pairs of independent samples; $\phi^{ex}_m$ (eq 105) maps
    $\phi$ and its bounds; $t^{spec}_m(\phi^\star)$ (eq 106) interpolates between scan times.
    `clip` bounds $\hat z_0$ in each step as in [`protocol1`][]. `progress(i, total)` is called after each master trajectory.

    **Returns:** `{"t", "phi_u", "phi_v", "phi_indep_u", "phi_indep_v", "ex_u", "ex_v", "t_spec_u", "t_spec_v",
    "gap", "n_pairs"}`: `phi_*` and `ex_*` are dicts of arrays `value`, `lower`, `upper` over `t`
    (increasing); `t_spec_*` are [`Crossing`][]s, `t_spec_*_band` the crossings of the lower and upper
    Wilson curves (which bracket it), and `gap` = $t^{spec}_v - t^{spec}_u$ (NaN unless both crossed).
    Where independent samples always agree on a mode ($\phi^{indep} = 1$: its classifier gives one class
    to everything, as for an untrained model), eq (105) is undefined: `ex_*` is NaN and the crossing's
    status "undefined".
    """
    ts = timesteps(schedule.T, num_steps)
    scan = sorted(set(_on_grid(scan_t, ts, "`scan_t` must be a non-empty set")))
    if not (isinstance(repeats, int | np.integer) and repeats >= 1):
        raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}.")
    check_level(phi_star, "phi_star")
    run = dict(method="ddpm", num_steps=len(ts), clip=clip)
    agree = np.zeros((2, len(scan)), np.int64)
    indep = np.zeros(2, np.int64)
    for r in range(int(repeats)):
        z_start, key = _start(noise, n, seed * 100_003 + r)
        k_master, k_clone, k_indep = jax.random.split(key, 3)
        master = sample(eps_fn, schedule, noise, k_master, z_start, log_at=tuple(scan), **run)
        b = z_start.shape[0]
        for j, t in enumerate(scan):  # both clones in one batch: the reverse noise is drawn per sample, so independent
            twins = jnp.concatenate([master.z_log[j], master.z_log[j]])
            z0 = sample(eps_fn, schedule, noise, jax.random.fold_in(k_clone, j), twins, start_t=jnp.int32(t), **run).z0
            y = classify_modes(classifiers, z0)
            agree[:, j] += [np.sum(y[m][:b] == y[m][b:]) for m in range(2)]
        # independent samples: 2n fresh starts through the same compiled sampler, from its first step
        k_z, k_run = jax.random.split(k_indep)
        z0 = sample(eps_fn, schedule, noise, k_run, _spread(noise.sample(k_z, (2 * b,) + z_start.shape[1:])), start_t=jnp.int32(ts[0]),
                    **run).z0
        y = classify_modes(classifiers, z0)
        indep += [np.sum(y[m][:b] == y[m][b:]) for m in range(2)]
        if progress is not None:
            progress(r + 1, int(repeats))
    pairs = int(repeats) * int(n)
    out = {"t": np.asarray(scan), "n_pairs": pairs}
    for m, name in enumerate("uv"):
        bounds = np.array([wilson(int(k), pairs) for k in agree[m]])
        phi = {"value": agree[m] / pairs, "lower": bounds[:, 0], "upper": bounds[:, 1]}
        lo, hi = wilson(int(indep[m]), pairs)
        p_ind = indep[m] / pairs
        out[f"phi_{name}"], out[f"phi_indep_{name}"] = phi, {"value": float(p_ind), "lower": lo, "upper": hi}
        if p_ind >= 1:  # C_m gives every sample one class: eq (105) has no curve (reported, not computed)
            out[f"ex_{name}"] = {k: np.full(len(scan), np.nan) for k in phi}
            out[f"t_spec_{name}"] = Crossing(float("nan"), "undefined")
            out[f"t_spec_{name}_band"] = (out[f"t_spec_{name}"], out[f"t_spec_{name}"])
            continue
        ex = out[f"ex_{name}"] = {k: excess_agreement(v, p_ind) for k, v in phi.items()}
        out[f"t_spec_{name}"] = speciation_crossing(out["t"], ex["value"], phi_star)
        # the band's crossings bracket t_spec: the lower curve crosses earlier (smaller t), the upper later
        out[f"t_spec_{name}_band"] = (speciation_crossing(out["t"], ex["lower"], phi_star),
                                      speciation_crossing(out["t"], ex["upper"], phi_star))
    tu, tv = out["t_spec_u"], out["t_spec_v"]
    out["gap"] = tv.time - tu.time if tu.found and tv.found else float("nan")
    return out


# ------------------------------------------------------------------------------------------------ theory beside it


def timestep_of_ou_time(schedule: VPSchedule, s) -> np.ndarray:
    r"""The (fractional) diffusion timestep whose signal level equals that of OU time `s`:
    $\bar\alpha_t = e^{-2s}$ (the VP forward law is the OU $dX = -X\,ds + \sqrt2\,\sigma\,dW$ at $s$),
    linearly interpolated in $\log \bar\alpha$; NaN outside the schedule's range."""
    return np.asarray(schedule.timestep(np.asarray(s, np.float64), outside="nan"), np.float64)


def mode_theory(data, schedule: VPSchedule, gs) -> list[dict]:
    r"""The per-mode speciation times that the toolkit's closed-form theory predicts for the Protocol II data.

    Each mode m of the unswapped pairs (u, v in the model's [-1, 1] units, eq 91) is summarised as
    a two-class mixture in $d = 784$ dimensions: the half-distance of the two class means gives
    $m^2$ per dimension and the within-class pixel variance $\sigma^2$ (the swap symmetry, which
    makes v's class means vanish, is left out: C_v is sign-blind). The forward law of mode m under
    the mode-shaped noise is an OU process with stationary variance $\sigma_m^2 = 1 \mp g$ (eq 92),
    so [`speciation_time`][] with $d\,\kappa = 1$ gives its OU time, mapped to a diffusion timestep
    by [`timestep_of_ou_time`][]. Eq (95)'s SNR ratio $(1 + g)/(1 - g)$ is reported beside it.

    **Returns:** one dict per g: `g`, `t_u`, `t_v` (timesteps; NaN where no speciation is
    predicted), `gap` $= t_v - t_u$, `snr_ratio`, and the mixture's `m2` and `var` per mode.
    """
    from ..theory.mixture import TwoClassMixture
    from ..theory.ou import CoupledOU
    from ..theory.speciation import speciation_time

    labels = np.asarray(data.labels)
    classes = sorted(set(labels.tolist()))
    if len(classes) != 2:
        raise ValueError(f"the theory compares two classes; the data hold {classes}.")
    pairs = 2 * np.stack([np.asarray(data.x), np.asarray(data.tx)], -1) - 1  # unswapped, [-1, 1]
    r = 1 / np.sqrt(2)
    modes = {"u": (pairs[..., 0] + pairs[..., 1]) * r, "v": (pairs[..., 0] - pairs[..., 1]) * r}
    stats = {}
    for m, img in modes.items():
        flat = img.reshape(len(img), -1).astype(np.float64)
        mu = [flat[labels == c].mean(0) for c in classes]
        var = float(np.mean([flat[labels == c].var(0).mean() for c in classes]))
        stats[m] = (float(np.sum(((mu[1] - mu[0]) / 2) ** 2) / flat.shape[1]), var, flat.shape[1])
    out = []
    for g in gs:
        g = float(g)
        if not 0 <= g < 1:
            raise ValueError(f"`gs` must lie in [0, 1), got {g!r}.")
        row = {"g": g, "snr_ratio": (1 + g) / (1 - g)}
        for m, sigma2 in (("u", 1 - g), ("v", 1 + g)):
            m2, var, d = stats[m]
            mix = TwoClassMixture(np.array([[m2]]), np.array([var]))
            sol = speciation_time(CoupledOU(np.array([[-1.0]]), 2 * sigma2), mix, dim=d, t_max=20.0, throw=False)
            row[f"t_{m}"] = float(timestep_of_ou_time(schedule, float(sol.value)))
            row[f"m2_{m}"], row[f"var_{m}"] = m2, var
        row["gap"] = row["t_v"] - row["t_u"]
        out.append(row)
    return out
