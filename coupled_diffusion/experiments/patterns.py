r"""Pattern formation on exact patch score models (issue 19): mode softening, the critical time, growing
correlation lengths and a Ginzburg-Landau reading, on MNIST digits.

[`pattern_formation`][] fits three patch models to downsampled MNIST digits (one modality, periodic
$L \times L$ images in $[-1, 1]$, the forward process $dZ = -Z dt + \sqrt 2 dW$): the Gaussian and
two-cluster closed forms ([`GaussianPatchScore`][]) and the equivariant empirical patch score
([`PatchScore`][]), beside the full empirical score (which memorises). For each it computes

- the exact Fourier growth rates of the reverse drift linearised about the mean state, on a time grid,
  and the critical time $t_c$ (`critical_time`, with its result code when there is none);
- the rates of the *mean* Jacobian over reverse samples of $z_t$ at small $|q|$ (jvp probes): where the
  score's nonlinearity matters (the empirical patch model), the mean state is not a typical state;
- reverse-SDE samples, and the second-moment correlation length $\xi(t)$ of the fluctuations of $z_t$ and
  of $\hat x_0(z_t)$ (Tweedie) across samples, with jackknife errors;
- the Ginzburg-Landau fit $\lambda_t(q) = -(r + c\hat q^2)$ of the small-$q$ rates and its predicted
  $\xi = \sqrt{c/|r|}$, beside the measured one;
- creativity: each final sample's distance to its nearest training image.

It returns plain data (lists and arrays); `plotting.py` draws it and the CLI writes it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling.criticality import correlation_length, critical_time, ginzburg_landau_fit, mode_growth_rates
from ..sampling.patch import GaussianPatchScore, PatchScore
from ..sampling.scores import EmpiricalScore
from ..sampling.sde import reverse_sde
from ..theory.ou import CoupledOU

MODELS = ("gaussian", "two_cluster", "patch_empirical", "full_empirical")


def mnist_images(n: int, side: int, *, path=None, offset: int = 0) -> np.ndarray:
    """`n` MNIST training digits averaged down to `side` x `side` (28 must be a multiple of `side`), in [-1, 1],
    shape `(n, 1, side, side)`."""
    from ..data.mnist import load_mnist

    if 28 % side:
        raise ValueError(f"`side` must divide 28 (the digits are averaged down in blocks), got {side}.")
    x, _ = load_mnist("train", path)
    if not 1 <= n <= len(x) - offset:
        raise ValueError(f"`n` must be in [1, {len(x) - offset}] training digits, got {n}.")
    f = 28 // side
    x = x[offset:offset + n].reshape(n, side, f, side, f).mean((2, 4))
    return (2.0 * x - 1.0)[:, None].astype(np.float32)


def _grid_times(t_start, t_end, n_steps, n_saves):
    """About `n_saves` distinct forward times on the sampler's grid `t_end + j h`, log-spaced in `j`, descending."""
    h = (t_start - t_end) / n_steps
    j = np.unique(np.rint(np.geomspace(1, n_steps - 1, n_saves)).astype(int))
    return (t_end + j * h)[::-1]


def pattern_formation(
    *,
    side: int = 14,
    patch: int = 5,
    n_fit: int = 300,
    n_bank: int = 100,
    t_max: float = 3.0,
    n_times: int = 48,
    n_samples: int = 128,
    n_steps: int = 200,
    n_saves: int = 16,
    n_annealed: int = 8,
    annealed_shells: int = 6,
    gl_shells: int = 3,
    mnist_path=None,
    key=None,
    progress: Callable | None = None,
) -> dict:
    """The whole experiment of the module docstring; `progress(done, total)` is called after each stage."""
    key = jax.random.key(0) if key is None else key
    stages, done = 3 + 1 + len(MODELS) + 1, 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, stages)

    fit_images = mnist_images(n_fit, side, path=mnist_path)
    bank = fit_images[:n_bank]
    d = side * side
    ou = CoupledOU(jnp.array([[-1.0]]), 2.0)
    models = {
        "gaussian": GaussianPatchScore.fit(ou, fit_images, patch, clusters=1),
        "two_cluster": GaussianPatchScore.fit(ou, fit_images, patch, clusters=2),
        "patch_empirical": PatchScore.of(ou, bank, patch),
        "full_empirical": EmpiricalScore.of(ou, bank.reshape(n_bank, 1, d)),
    }
    ts = np.geomspace(t_max / 300, t_max, n_times)
    out = {"params": dict(side=side, patch=patch, n_fit=n_fit, n_bank=n_bank, t_max=t_max, n_times=n_times, n_samples=n_samples,
                          n_steps=n_steps, n_saves=n_saves, n_annealed=n_annealed, annealed_shells=annealed_shells,
                          gl_shells=gl_shells, process="M = -1, sigma_W^2 = 2 (k = 1)", data="MNIST train, block-averaged, [-1, 1]"),
           "times": ts, "models": {}}
    out["params"]["two_cluster_weights"] = np.exp(np.asarray(models["two_cluster"].log_weights)).tolist()

    # 1. exact rates about the mean state, t_c, the Ginzburg-Landau fit
    for name in MODELS[:3]:
        s = models[name]
        rates = mode_growth_rates(ou, s, jnp.asarray(ts))
        n2, shell = rates.shells()
        sol = critical_time(lambda t, a: mode_growth_rates(ou, a, t).top, s, t_min=ts[0], t_max=t_max, throw=False)
        gl = ginzburg_landau_fit(rates, shells=gl_shells)
        top_mode = np.asarray(rates.wavenumbers)[np.asarray(rates.top_mode)]
        out["models"][name] = {
            "shell_n2": n2, "shell_rates": np.asarray(shell[..., 0]), "top": np.asarray(rates.top),
            "top_mode_n2": np.sum(top_mode**2, -1), "t_c": float(sol.value) if bool(sol.found) else None,
            "t_c_result": "found" if bool(sol.found) else _first_sentence(sol.message),
            "gl_r": np.asarray(gl.r), "gl_c": np.asarray(gl.c), "gl_xi": np.asarray(gl.xi), "gl_rms": np.asarray(gl.rms),
        }
        tick()

    # the jvp route against the exact one (two-cluster model, small-q modes, three times)
    from ..sampling.criticality import fourier_modes

    small = fourier_modes(side, 2)
    small = small[np.sum(small**2, -1) <= 2]
    check_t = jnp.asarray(ts[[n_times // 4, n_times // 2, 3 * n_times // 4]])
    s2 = models["two_cluster"]
    exact = mode_growth_rates(ou, s2, check_t)
    jvp = mode_growth_rates(ou, s2, check_t, method="jvp", modes=small)
    pick = [int(np.flatnonzero((np.asarray(exact.wavenumbers) == m).all(1))[0]) for m in small]
    out["jvp_vs_exact_max_abs"] = float(jnp.max(jnp.abs(jvp.matrix - exact.matrix[:, pick])))
    tick()

    # 2. reverse samples, xi(t) of z_t and of x0-hat, creativity
    t_end = t_max / n_steps
    save = _grid_times(t_max, t_end, n_steps, n_saves)
    out["save_times"] = save
    E_T, Q_T = models["gaussian"].path(t_max)
    mean0 = float(np.mean(fit_images))
    z0 = (E_T[0, 0] * mean0 + jnp.sqrt(Q_T[0, 0]) * jax.random.normal(jax.random.fold_in(key, 1), (n_samples, 1, d)))
    every = fourier_modes(side, 2)
    annealed_modes = every[np.sum(every**2, -1) <= np.unique(np.sum(every**2, -1))[annealed_shells - 1]]
    samples = {}
    for i, name in enumerate(MODELS):
        s = models[name]
        zs, zT = reverse_sde(ou, s, z0, key=jax.random.fold_in(key, 10 + i), t_start=t_max, t_end=t_end, n_steps=n_steps,
                             save_at=jnp.asarray(save))
        rec = out["models"].setdefault(name, {})
        xi_z, xi_z_err, xi_x, xi_x_err = [], [], [], []
        for j, t in enumerate(save):
            E, Q = models["gaussian"].path(float(t))  # the process's moments (the same for every model)
            z = zs[j]
            x0 = (z + Q[0, 0] * s(float(t), z)) / E[0, 0]
            for field, xs, es in ((z, xi_z, xi_z_err), (x0, xi_x, xi_x_err)):
                c = correlation_length(np.asarray(field[:, 0]).reshape(-1, side, side), ndim=2)
                xs.append(float(c.xi))
                es.append(float(c.stderr))
        rec.update(xi_z=np.array(xi_z), xi_z_err=np.array(xi_z_err), xi_x0=np.array(xi_x), xi_x0_err=np.array(xi_x_err))
        final = np.asarray(zT[:, 0])
        dist = np.sqrt(np.min(((final[:, None, :] - bank.reshape(n_bank, d)[None]) ** 2).mean(-1), axis=1))
        rec["nearest_rms"] = {"median": float(np.median(dist)), "q10": float(np.quantile(dist, 0.1)),
                              "q90": float(np.quantile(dist, 0.9))}
        samples[name] = final[:16].reshape(16, side, side)
        if name != "full_empirical":  # the mean Jacobian over samples of z_t at small |q|
            idx = np.linspace(0, len(save) - 1, min(len(save), 8)).round().astype(int)
            ann = []
            for j in idx:
                r = mode_growth_rates(ou, s, float(save[j]), method="jvp", z=zs[j][:n_annealed], modes=annealed_modes)
                ann.append(np.asarray(r.rates[:, 0]))
            n2a = np.sum(annealed_modes**2, -1)
            rec["annealed_times"] = save[idx]
            rec["annealed_n2"] = np.unique(n2a)
            rec["annealed_shell_rates"] = np.array([[a[n2a == v].mean() for v in np.unique(n2a)] for a in ann])
        tick()
    out["samples"] = samples
    out["training_examples"] = bank[:16, 0]

    # 3. GL predictions at the save times (rates there), beside the measured xi
    for name in MODELS[:2]:
        gl = ginzburg_landau_fit(mode_growth_rates(ou, models[name], jnp.asarray(save)), shells=gl_shells)
        out["models"][name]["gl_xi_at_save"] = np.asarray(gl.xi)
    tick()
    return out


def _first_sentence(text: str) -> str:
    return text.split(":")[0] if ":" in text else text


def network_criticality(eps_fn, schedule, x_mean, *, shape, shells: int = 6, n_times: int = 16, gl_shells: int = 3,
                        batch: int | None = 64) -> dict:
    r"""Mode rates, $t_c$ and the Ginzburg-Landau fit of a trained VP noise predictor (a U-Net or DiT of the MNIST runs).

    The network is read as the score of its equivalent OU process ([`VPScore`][]); the reverse drift is linearised
    about the mean state $\sqrt{\bar\alpha_n}\,\bar x$ (`x_mean`, `(k, H W)`: the training data's mean image) at
    `n_times` timesteps log-spaced over the schedule, and probed by jvp on the wavenumbers of the `shells` smallest
    $|q|$ shells (the network's Jacobian is not translation invariant: these are the diagonal elements of $J$ in the
    Fourier basis). $t_c$ is where the linear interpolation of the top rate over the timesteps' OU times crosses
    zero (`critical_time`, with its result code). `shape`: the model's `(H, W, k)`.
    """
    from ..diffusion.exact import VPScore
    from ..sampling.criticality import ModeRates, _jvp_symbol, _sorted_real_eigenvalues, fourier_modes, reverse_drift

    H, W, k = shape
    if H != W:
        raise ValueError(f"the images must be square for the Fourier shells, got {H} x {W}.")
    vp = VPScore.of(eps_fn, schedule, shape=shape)
    x_mean = jnp.asarray(x_mean, jnp.float32)
    if x_mean.shape != (k, H * W):
        raise ValueError(f"`x_mean` must be (k, H W) = ({k}, {H * W}), got {x_mean.shape}.")
    T = int(schedule.alphas_cumprod.shape[0])
    steps = np.unique(np.rint(np.geomspace(1, T - 1, n_times)).astype(int))
    s = np.asarray(vp.ou_time(steps), np.float64)
    every = fourier_modes(H, 2)
    n2 = np.sum(every**2, -1)
    modes = every[n2 <= np.unique(n2)[shells - 1]]
    drift = reverse_drift(vp.ou, vp)

    def one(args):
        ss, ab = args
        zbar = jnp.sqrt(ab) * x_mean
        return _jvp_symbol(lambda v: drift(ss, v), zbar, modes, H, 2, batch, reverse=True)  # custom-VJP convolutions

    ab = schedule.alphas_cumprod[jnp.asarray(steps)]
    G = jax.jit(lambda a, b: jax.lax.map(one, (a, b)))(jnp.asarray(s, jnp.float32), ab)
    rates = ModeRates(jnp.asarray(modes), G, _sorted_real_eigenvalues(G), H)
    top = np.asarray(rates.top, np.float64)
    sol = critical_time(lambda t, r: jnp.interp(t, jnp.asarray(s), r), jnp.asarray(top), t_min=s[0], t_max=s[-1],
                        grid_size=4 * len(s), throw=False)
    gl = ginzburg_landau_fit(rates, shells=gl_shells)
    shell_n2, shell_rates = rates.shells()
    return {
        "timesteps": steps, "ou_times": s, "shell_n2": shell_n2, "shell_rates": np.asarray(shell_rates[..., 0]), "top": top,
        "t_c": float(sol.value) if bool(sol.found) else None, "t_c_result": "found" if bool(sol.found) else _first_sentence(sol.message),
        "t_c_timestep": float(np.interp(float(sol.value), s, steps)) if bool(sol.found) else None,
        "gl_r": np.asarray(gl.r), "gl_c": np.asarray(gl.c), "gl_xi": np.asarray(gl.xi),
    }
