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

from ..sampling.criticality import correlation_length, critical_time, fourier_modes, ginzburg_landau_fit, mode_growth_rates
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


def _shell_modes(side: int, shells: int) -> np.ndarray:
    """The wavenumbers `(n_q, 2)` of the `shells` smallest |q| shells of a side x side periodic image."""
    every = fourier_modes(side, 2)
    n2 = np.sum(every**2, -1)
    return every[n2 <= np.unique(n2)[shells - 1]]


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
            "t_c_result": _result_text(sol),
            "gl_r": np.asarray(gl.r), "gl_c": np.asarray(gl.c), "gl_xi": np.asarray(gl.xi), "gl_rms": np.asarray(gl.rms),
        }
        tick()

    # the jvp route against the exact one (two-cluster model, small-q modes, three times)
    small = _shell_modes(side, 3)  # |n|^2 <= 2
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
    annealed_modes = _shell_modes(side, annealed_shells)
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


def _result_text(sol) -> str:
    """"found", or the first sentence of a failed solve's message (for JSON and tables)."""
    return "found" if bool(sol.found) else _first_sentence(sol.message)


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
    from ..sampling.criticality import ModeRates, _jvp_symbol, _sorted_real_eigenvalues, reverse_drift

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
    modes = _shell_modes(H, shells)
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
        "t_c": float(sol.value) if bool(sol.found) else None, "t_c_result": _result_text(sol),
        "t_c_timestep": float(np.interp(float(sol.value), s, steps)) if bool(sol.found) else None,
        "gl_r": np.asarray(gl.r), "gl_c": np.asarray(gl.c), "gl_xi": np.asarray(gl.xi),
    }


# ------------------------------------------------------------------------------------------------ guidance pulses


def _diversity(features, labels, classes, idx=None):
    """Mean pairwise Euclidean feature distance within each class, averaged over the classes."""
    vals = []
    for c in classes:
        ids = np.flatnonzero(labels == c) if idx is None else np.asarray(idx[c])
        f = features[ids]
        d = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 0.0))
        distinct = ids[:, None] != ids[None]  # a bootstrap draw repeats samples: a sample is no pair with itself
        if distinct.any():
            vals.append(d[distinct].mean())
    return float(np.mean(vals))


def guidance_comparison(model, classifier, schedule, *, t_c: float, half_width: float = 0.25, scale: float = 2.0,
                        per_class: int = 20, num_steps: int = 50, eta: float = 1.0, n_boot: int = 1000, controls=(),
                        key=None) -> dict:
    r"""Classifier-free guidance pulses at the critical time against constant guidance of the same total strength
    and against none, on a class-conditional model (the MNIST DiT) with a digit classifier trained here.

    Three conditions share every random number (the starting noise and the sampler's noise), so their
    differences are paired: `none` ($w = 1$, plain conditional sampling), `pulse` ($w = 1 +$ `scale` for OU times
    in $[t_c - $ `half_width`$, t_c + $ `half_width`$]$), `constant` (one $w$ everywhere with the pulse's
    [`guidance_strength`][]). `per_class` samples of each digit, DDIM with `eta` (1: the DDPM-like sampler of
    `sample_quality`), $\hat x_0$ clipped to [-1, 1]. Measured per condition: class accuracy (the classifier's
    argmax is the asked digit) and recognisability (correct with probability >= 0.9), each with a Wilson 95%
    interval; diversity, the mean pairwise distance of the classifier's penultimate features within a digit
    (averaged over digits), with a bootstrap 95% interval; and the paired differences pulse - none,
    pulse - constant, constant - none with bootstrap 95% intervals over the paired samples. `controls`: other
    window centres (OU times); each adds a condition `pulse@<centre>` (the same scale and half-width there) and
    the difference `pulse-pulse@<centre>`, which isolates *where* the pulse sits from *how much* guidance it adds.
    `model(z, t, y)`: a class-conditional predictor of 28 x 28 x 1 digits (a [`DiT`][] or [`GaussianMixtureEps`][]).
    """
    from flax import nnx

    from ..diffusion.noise import ModeNoise
    from ..diffusion.samplers import GuidedEps, guidance_strength, guidance_weights, matched_constant_scale, sample
    from ..sampling.cloning import wilson_interval

    key = jax.random.key(0) if key is None else key
    window = (max(t_c - half_width, 0.0), t_c + half_width)
    const = matched_constant_scale(schedule, scale, window, num_steps)
    weights = {"none": guidance_weights(schedule, 0.0), "pulse": guidance_weights(schedule, scale, window),
               "constant": guidance_weights(schedule, const)}
    for c in controls:
        weights[f"pulse@{c:.2f}"] = guidance_weights(schedule, scale, (max(c - half_width, 0.0), c + half_width))
    y = np.repeat(np.arange(10, dtype=np.int32), per_class)
    z0 = jax.random.normal(jax.random.fold_in(key, 0), (y.size, 28, 28, 1), jnp.float32)
    noise = ModeNoise.isotropic(1)
    graphdef, state = nnx.split(classifier)
    classify = jax.jit(lambda x: (nnx.merge(graphdef, state).features(x), nnx.merge(graphdef, state)(x)))
    results, samples, per = {}, {}, {}
    for name, w in weights.items():
        x = sample(GuidedEps(model, y, w), schedule, noise, jax.random.fold_in(key, 1), z0, method="ddim", num_steps=num_steps,
                   eta=eta, clip=1.0).z0
        feats, logits = (np.asarray(a, np.float64) for a in classify(x))
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        correct = prob.argmax(-1) == y
        confident = correct & (prob.max(-1) >= 0.9)
        per[name] = (correct, confident, feats)
        samples[name] = np.asarray(x[::per_class, ..., 0])
        results[name] = {"accuracy": float(correct.mean()), "accuracy_ci": [float(v) for v in wilson_interval(correct.sum(), y.size)],
                         "recognisable": float(confident.mean()),
                         "recognisable_ci": [float(v) for v in wilson_interval(confident.sum(), y.size)],
                         "diversity": _diversity(feats, y, range(10)),
                         "strength": guidance_strength(schedule, w, num_steps)}
    rng = np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 2), (), 0, 2**31 - 1)))
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    boots = {name: {"accuracy": [], "recognisable": [], "diversity": []} for name in weights}
    for _ in range(n_boot):
        idx = {c: rng.choice(by_class[c], size=len(by_class[c])) for c in range(10)}  # the same resample for every condition
        flat = np.concatenate(list(idx.values()))
        for name, (correct, confident, feats) in per.items():
            boots[name]["accuracy"].append(correct[flat].mean())
            boots[name]["recognisable"].append(confident[flat].mean())
            boots[name]["diversity"].append(_diversity(feats, y, range(10), idx))
    for name in weights:
        div = np.asarray(boots[name]["diversity"])
        results[name]["diversity_ci"] = [float(np.quantile(div, 0.025)), float(np.quantile(div, 0.975))]
    diffs = {}
    for a, b in (("pulse", "none"), ("pulse", "constant"), ("constant", "none")) + tuple(("pulse", n) for n in list(weights)[3:]):
        diffs[f"{a}-{b}"] = {}
        for metric in ("accuracy", "recognisable", "diversity"):
            d = np.asarray(boots[a][metric]) - np.asarray(boots[b][metric])
            diffs[f"{a}-{b}"][metric] = {"value": results[a][metric] - results[b][metric],
                                         "ci": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]}
    return {"params": {"t_c": t_c, "window": list(window), "scale": scale, "constant_scale": const, "per_class": per_class,
                       "num_steps": num_steps, "eta": eta, "n_boot": n_boot, "controls": [float(c) for c in controls]},
            "conditions": results, "differences": diffs, "samples": samples}


def _steepest_xi_time(s, xi):
    """The geometric midpoint of the two consecutive logged OU times between which xi changes most (None if
    fewer than two finite values)."""
    s, xi = np.asarray(s, float), np.asarray(xi, float)
    ok = np.isfinite(xi) & (s > 0)
    s, xi = s[ok], xi[ok]
    if s.size < 2:
        return None
    order = np.argsort(s)
    s, xi = s[order], xi[order]
    j = int(np.argmax(np.abs(np.diff(xi))))
    return float(np.sqrt(s[j] * s[j + 1]))


def dit_patterns(run_dir, *, mnist_path=None, scale: float = 2.0, half_width: float = 0.25, per_class: int = 20,
                 num_steps: int = 50, n_times: int = 16, shells: int = 6, xi_samples: int = 128, key=None, progress: bool = True,
                 cfg=None) -> dict:
    r"""The class-conditional MNIST DiT of `coupled-diffusion dit-sync` (trained, or reused, in `run_dir` with the
    `DiTSync` defaults) through the criticality lens, and the guidance comparison at its critical time.

    The unconditional predictor (the null class) is linearised about $\sqrt{\bar\alpha_n}\,\bar x$ (the training
    digits' mean) by [`network_criticality`][] and, by [`network_xi`][], averaged over its own reverse samples
    (the annealed rates). The mean-state $t_c$ (OU time), or when there is none the annealed one, or when there is
    neither the time at which the samples' $\xi(\hat x_0)$ changes most (between two logged times) centres the
    guidance window of [`guidance_comparison`][] (`guidance_t_c`, `guidance_t_c_source` record which).
    `cfg`: a `DiTSync` for the model and classifier (default: `dit-sync`'s defaults with `mnist_path`).
    """
    from pathlib import Path

    import equinox as eqx
    from flax import nnx

    from ..diffusion.noise import VPSchedule
    from .dit_sync import DiTSync, _images, train_digit_classifier, train_mnist_dit

    if cfg is None:
        cfg = DiTSync(data_path=None if mnist_path is None else str(mnist_path))
    cfg.validate()
    run_dir = Path(run_dir)
    classifier, accuracy = train_digit_classifier(cfg, run_dir, progress=progress)
    model, _ = train_mnist_dit(cfg, run_dir, progress=progress)
    schedule = VPSchedule.linear(cfg.T)

    class Unconditional(eqx.Module):
        graphdef: object = eqx.field(static=True)
        state: object

        def __call__(self, z, t):
            return nnx.merge(self.graphdef, self.state)(z, t, jnp.full(z.shape[:1], 10, jnp.int32))[..., : z.shape[-1]]

    images, _ = _images(cfg, "train")
    x_mean = np.asarray(images, np.float64).mean(0).reshape(1, -1)
    net = network_criticality(Unconditional(*nnx.split(model)), schedule, x_mean, shape=(28, 28, 1), shells=shells,
                              n_times=n_times)
    from ..diffusion.noise import ModeNoise

    net.update(network_xi(Unconditional(*nnx.split(model)), schedule, ModeNoise.isotropic(1), shape=(28, 28, 1),
                          n_samples=xi_samples, num_steps=num_steps, key=None if key is None else jax.random.fold_in(key, 7)))
    out = {"dit": net, "classifier_test_accuracy": accuracy, "config": {"T": cfg.T, "train_steps": cfg.train_steps}}
    t_c, source = (net["t_c"], "mean state") if net["t_c"] is not None else (net.get("annealed_t_c"), "annealed")
    if t_c is None:  # no linear instability: where the samples' x0-hat correlation length changes fastest instead
        t_c, source = _steepest_xi_time(net["xi_ou_times"], net["xi_x0"]), "steepest xi(x0-hat)"
    net["guidance_t_c"], net["guidance_t_c_source"] = t_c, source
    if t_c is None:
        out["guidance"] = {"skipped": f"no critical time: about the mean state {net['t_c_result']}; annealed "
                                      f"{net.get('annealed_t_c_result')}"}
    else:
        out["guidance"] = guidance_comparison(model, classifier, schedule, t_c=t_c, half_width=half_width, scale=scale,
                                              per_class=per_class, num_steps=num_steps, key=key)
        out["guidance"]["params"]["t_c_source"] = source
    return out


def network_xi(eps_fn, schedule, noise, *, shape, n_samples: int = 128, num_steps: int = 50, n_logs: int = 12, channel: int = 0,
               eta: float = 1.0, n_states: int = 8, shells: int = 6, key=None) -> dict:
    r"""$\xi(t)$ of a trained VP model's reverse samples: `n_samples` trajectories of [`sample`][] (DDIM with `eta`, from
    the model's noise law), $z_t$ and $\hat x_0$ logged at about `n_logs` of the sampler's timesteps (log-spaced in
    OU time), and the second-moment correlation length of `channel`'s fluctuations across samples, with jackknife
    errors. With `n_states`, also the *annealed* rates: the Fourier symbol of the drift's Jacobian averaged over the
    first `n_states` logged states $z_t$ at each logged time (the `shells` smallest |q| shells, reverse-mode probes),
    and their critical time `annealed_t_c` (interpolated over the logged OU times). `shape`: `(H, W, k)`, square
    images. **Returns:** `xi_timesteps`, `xi_ou_times`, `xi_z`, `xi_x0` and their `_err`; `annealed_shell_n2`,
    `annealed_shell_rates`, `annealed_top`, `annealed_t_c` (None without a crossing) and `annealed_t_c_result`."""
    from ..diffusion.exact import VPScore
    from ..diffusion.samplers import sample, timesteps

    H, W, k = shape
    key = jax.random.key(0) if key is None else key
    ts = timesteps(schedule.T, num_steps)
    vp = VPScore.of(eps_fn, schedule, shape=shape)
    s = np.asarray(vp.ou_time(ts), np.float64)
    want = np.geomspace(s[-1], s[0], n_logs)
    log_at = tuple(sorted({int(ts[np.argmin(np.abs(s - w))]) for w in want}, reverse=True))
    z0 = noise.sample(jax.random.fold_in(key, 0), (n_samples, H, W, k))
    res = sample(eps_fn, schedule, noise, jax.random.fold_in(key, 1), z0, method="ddim", num_steps=num_steps, eta=eta,
                 log_at=log_at, clip=1.0)
    out = {"xi_timesteps": np.asarray(log_at), "xi_ou_times": np.asarray(vp.ou_time(np.asarray(log_at)), np.float64)}
    for name, logs in (("xi_z", res.z_log), ("xi_x0", res.x0_log)):
        est = [correlation_length(np.asarray(logs[j][..., channel]), ndim=2) for j in range(len(log_at))]
        out[name] = np.array([float(e.xi) for e in est])
        out[name + "_err"] = np.array([float(e.stderr) for e in est])
    if n_states:  # the mean Jacobian over the model's own states z_t (reverse-mode probes, small-|q| shells)
        from ..sampling.criticality import _jvp_symbol, _sorted_real_eigenvalues, reverse_drift

        modes = _shell_modes(H, shells)
        drift = reverse_drift(vp.ou, vp)

        def mean_symbol(args):
            ss, zs = args
            flat = jnp.moveaxis(zs, -1, 1).reshape(zs.shape[0], k, H * W)
            return jax.lax.map(lambda z: _jvp_symbol(lambda v: drift(ss, v), z, modes, H, 2, 64, reverse=True), flat).mean(0)

        G = jax.jit(lambda a, b: jax.lax.map(mean_symbol, (a, b)))(jnp.asarray(out["xi_ou_times"], jnp.float32),
                                                                   res.z_log[:, :n_states])
        rates = np.asarray(_sorted_real_eigenvalues(G)[..., 0], np.float64)  # (L, n_q)
        m2 = np.sum(modes**2, -1)
        out["annealed_shell_n2"] = np.unique(m2)
        out["annealed_shell_rates"] = np.stack([rates[:, m2 == v].mean(1) for v in np.unique(m2)], 1)
        out["annealed_top"] = rates.max(1)
        order = np.argsort(out["xi_ou_times"])
        s_sorted, top_sorted = out["xi_ou_times"][order], out["annealed_top"][order]
        sol = critical_time(lambda t, r: jnp.interp(t, jnp.asarray(s_sorted), r), jnp.asarray(top_sorted),
                            t_min=max(s_sorted[0], 1e-6), t_max=s_sorted[-1], grid_size=4 * len(s_sorted), throw=False)
        out["annealed_t_c"] = float(sol.value) if bool(sol.found) else None
        out["annealed_t_c_result"] = _result_text(sol)
    return out


def mixture_guidance(out_dir, *, mnist_path=None, scale: float = 2.0, half_width: float = 0.25, per_class: int = 50,
                     num_steps: int = 50, controls="auto", classifier_steps: int = 800, ridge: float = 1e-3, key=None,
                     progress: bool = True) -> dict:
    r"""Guidance pulses on an *exact* class-conditional model: [`GaussianMixtureEps`][] fitted to the 28 x 28 MNIST
    training digits (one Gaussian per digit, full covariance plus `ridge`), under the linear VP schedule of 1000
    steps. Its unconditional reverse drift is known in closed form, so its critical time $t_c$ about the mean state
    (the top eigenvalue of the dense $784 \times 784$ drift Jacobian crossing zero, [`GaussianMixtureEps.critical_time`][])
    is exact rather than estimated, and $w = 1$ samples each digit's Gaussian exactly: any effect of the pulse is the
    guidance's, not a model error's. The digit classifier of `dit-sync` is trained (or reused) in
    `out_dir/classifier` for `classifier_steps`. [`guidance_comparison`][] then compares none / pulse at $t_c$ /
    matched constant, plus pulses of the same size centred elsewhere (`controls`; `"auto"`: $t_c \mp 4w$, kept
    above $w$). **Returns:** `t_c`, `t_c_result`, `rates` (`s`, `top`: the top rate on a grid), the classifier's
    test accuracy and the comparison (`guidance`)."""
    from pathlib import Path

    from ..data.mnist import load_mnist
    from ..diffusion.exact import GaussianMixtureEps
    from ..diffusion.noise import VPSchedule
    from .dit_sync import DiTSync, train_digit_classifier

    key = jax.random.key(0) if key is None else key
    cfg = DiTSync(classifier_steps=classifier_steps, data_path=None if mnist_path is None else str(mnist_path))
    cfg.validate()
    schedule = VPSchedule.linear(1000)
    x, y = load_mnist("train", mnist_path)
    model = GaussianMixtureEps.fit(2.0 * np.asarray(x)[..., None] - 1.0, y, schedule, num_classes=10, ridge=ridge)
    s_max = float(schedule.ou_time(schedule.T - 1))
    sol = model.critical_time(t_min=0.01, t_max=min(4.0, s_max), throw=False)
    grid = np.linspace(0.01, min(4.0, s_max), 41)
    top = np.asarray(jax.jit(jax.vmap(model.top_rate))(jnp.asarray(grid, model.means.dtype)), np.float64)
    out = {"t_c": float(sol.value) if bool(sol.found) else None, "t_c_result": _result_text(sol),
           "rates": {"s": grid, "top": top}, "ridge": ridge}
    classifier, accuracy = train_digit_classifier(cfg, Path(out_dir), progress=progress)
    out["classifier_test_accuracy"] = accuracy
    if out["t_c"] is None:
        out["guidance"] = {"skipped": f"no critical time: {out['t_c_result']}"}
        return out
    t_c = out["t_c"]
    if controls == "auto":
        controls = tuple(c for c in (t_c - 4 * half_width, t_c + 4 * half_width) if half_width <= c <= s_max - half_width)
    out["guidance"] = guidance_comparison(model, classifier, schedule, t_c=t_c, half_width=half_width, scale=scale,
                                          per_class=per_class, num_steps=num_steps, controls=tuple(controls), key=key)
    out["guidance"]["params"]["t_c_source"] = "exact (Gaussian mixture, mean state)"
    return out
