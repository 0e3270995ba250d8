"""Reverse-SDE throughput on the Appendix C workload: coupled_diffusion vs NumPy vs a hand-written lax.scan.

Workload (eq 143): d = 32, 2000 trials, 800 Euler-Maruyama steps over T = 2, beta = 1,
sigma_W^2 = 2, constant g = 0.5, theta = pi/2, exact conditional score of y given the
forward path of x. Throughput is trajectory-steps per second (trials x steps / time),
median of repeats, all in float32, all after compilation.

- coupled_diffusion: `sampling.sde.reverse_conditional` (diffrax Euler on a
  `GridBrownianPath`, score `ConditionalScore`), jitted; Gaussian and Rademacher increments.
- NumPy: a vectorised float32 Euler-Maruyama loop, `default_rng().standard_normal`
  increments, the same score formula with the k x k moments precomputed per step.
- lax.scan: the same loop hand-written in JAX (precomputed moments, `jax.random.normal`
  per step): the practical limit.

Also printed: the share of the library's time spent drawing the increments (the cost of
drawing the same number of normals alone).

    python benchmarks/samplers.py [--trials 2000] [--steps 800] [--repeats 5]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import coupled_diffusion as cd
from coupled_diffusion.sampling.brownian import unit_increments
from coupled_diffusion.sampling.draws import realize_means, sample_data
from coupled_diffusion.sampling.scores import ConditionalScore
from coupled_diffusion.sampling.sde import reverse_conditional
from coupled_diffusion.sampling.trials import exact_ou_path

cd.tune_cpu()  # opt in to the CPU tuning (the library's import changes nothing), before JAX starts

BETA, SW2, T, G, D, M2 = 1.0, 2.0, 2.0, 0.5, 32, 0.1


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable; the contenders are interleaved, so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # compile / warm up
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def per_step_tables(ou, data, means, n_steps):
    """k x k quantities at the drift's evaluation times t_i = T - i dt (i = 0..N-1), for the baselines."""
    ts = T - np.arange(n_steps) * (T / n_steps)
    E, _, _, C = (np.asarray(x, np.float64) for x in cd.moments(ou, data, jnp.asarray(ts)))
    mu = np.einsum("tij,jd->tid", E, np.asarray(means, np.float64))
    Cxx, Cyx, Cyy = C[:, 0, 0], C[:, 1, 0], C[:, 1, 1]
    K = Cyx / Cxx
    return dict(
        K=K.astype(np.float32), var=(Cyy - Cyx * K).astype(np.float32), inv_cxx=(1 / Cxx).astype(np.float32),
        mu_x=mu[:, 0].astype(np.float32), mu_y=mu[:, 1].astype(np.float32),
    )


def numpy_em(y, x_path, tab, n_steps, seed):
    rng = np.random.default_rng(seed)
    dt = np.float32(T / n_steps)
    sdt = np.float32(np.sqrt(SW2 * T / n_steps))
    sw2, beta, g = np.float32(SW2), np.float32(BETA), np.float32(G)
    y = y.copy()
    for i in range(n_steps):
        x = x_path[n_steps - i]
        K, var, icx, mx, my = tab["K"][i], tab["var"][i], tab["inv_cxx"][i], tab["mu_x"][i], tab["mu_y"][i]
        proj = K * x
        m_p = my + proj - K * mx
        m_m = -my + proj + K * mx
        h = 2 * icx * (x @ mx)
        lw_p = -np.logaddexp(0, -h)
        lw_m = -np.logaddexp(0, h)
        a = lw_p - 0.5 * np.sum((y - m_p) ** 2, -1) / var
        b = lw_m - 0.5 * np.sum((y - m_m) ** 2, -1) / var
        r = 1 / (1 + np.exp(b - a))
        score = (r[:, None] * m_p + (1 - r[:, None]) * m_m - y) / var
        drift = beta * y - g * x + sw2 * score  # -(M z)_y = beta y - g x
        y = y + dt * drift + sdt * rng.standard_normal(y.shape, dtype=np.float32)
    return y


def make_scan_em(n_steps):
    @jax.jit
    def run(y, x_path, tab, key):
        dt = T / n_steps
        sdt = jnp.float32(np.sqrt(SW2 * dt))

        def step(y, i):
            x = x_path[n_steps - i]
            K, var, icx, mx, my = (tab[n][i] for n in ("K", "var", "inv_cxx", "mu_x", "mu_y"))
            proj = K * x
            m_p, m_m = my + proj - K * mx, -my + proj + K * mx
            h = 2 * icx * (x @ mx)
            a = jax.nn.log_sigmoid(h) - 0.5 * jnp.sum((y - m_p) ** 2, -1) / var
            b = jax.nn.log_sigmoid(-h) - 0.5 * jnp.sum((y - m_m) ** 2, -1) / var
            r = jax.nn.sigmoid(a - b)[:, None]
            score = (r * m_p + (1 - r) * m_m - y) / var
            noise = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
            return y + dt * (BETA * y - G * x + SW2 * score) + sdt * noise, None

        return jax.lax.scan(step, y, jnp.arange(n_steps))[0]

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    n, N = args.trials, args.steps
    work = n * N

    ou = cd.CoupledOU.anisotropic(BETA, G, SW2)
    data = cd.TwoClassMixture.from_angle(M2, M2, np.pi / 2)
    means = realize_means(data, D).astype(jnp.float32)
    data = cd.TwoClassMixture(data.gram.astype(jnp.float32), data.variances.astype(jnp.float32))
    key = jax.random.key(0)
    z0, _ = sample_data(key, data, means, n)
    x_path = exact_ou_path(z0[:, 0], unit_increments(jax.random.key(1), (N, n, D)), BETA, SW2, T / N)
    score = ConditionalScore.of(ou, data, means, target=1)
    y_T = score.sample(jax.random.key(2), T, x_path[-1][:, None, :])

    lib = {
        inc: jax.jit(lambda y, k, inc=inc: reverse_conditional(ou, score, y, x_path[:, :, None, :], t_start=T, n_steps=N, key=k,
                                                               increments=inc))
        for inc in ("gaussian", "rademacher")
    }

    @jax.jit
    def noise_only(key):  # the same per-step draws as the library's Gaussian run, and nothing else
        def step(c, i):
            return c + jax.random.normal(jax.random.fold_in(key, i), (n, D)), None

        return jax.lax.scan(step, jnp.zeros((n, D)), jnp.arange(N))[0]

    tab = per_step_tables(ou, data, means, N)
    x_np, y_np = np.asarray(x_path), np.asarray(y_T)
    scan = make_scan_em(N)
    tab_j = {k: jnp.asarray(v) for k, v in tab.items()}
    t = median_times({
        "gaussian": lambda: lib["gaussian"](y_T, jax.random.key(3)).block_until_ready(),
        "rademacher": lambda: lib["rademacher"](y_T, jax.random.key(3)).block_until_ready(),
        "noise": lambda: noise_only(jax.random.key(4)).block_until_ready(),
        "scan": lambda: scan(y_T, x_path, tab_j, jax.random.key(5)).block_until_ready(),
        "numpy": lambda: numpy_em(y_np, x_np, tab, N, 0),
    }, args.repeats)
    t_lib = {"gaussian": t["gaussian"], "rademacher": t["rademacher"]}
    t_noise, t_scan, t_np = t["noise"], t["scan"], t["numpy"]

    # agreement: the three Gaussian samplers target the same law; compare a summary statistic
    y_lib = np.asarray(lib["gaussian"](y_T, jax.random.key(6)))
    y_scan = np.asarray(scan(y_T, x_path, tab_j, jax.random.key(7)))
    y_ref = numpy_em(y_np, x_np, tab, N, 1)
    mean_sq = [float(np.mean(np.sum(v**2, -1))) for v in (y_lib, y_scan, y_ref)]

    print(f"Appendix C workload: d={D}, {n} trials x {N} steps, float32, devices={jax.devices()}")
    rate = lambda t: f"{work / t / 1e6:7.2f} M traj-steps/s"
    print(f"coupled_diffusion, Gaussian increments:   {rate(t_lib['gaussian'])}  ({t_lib['gaussian'] * 1e3:.0f} ms)")
    print(f"coupled_diffusion, Rademacher increments: {rate(t_lib['rademacher'])}  ({t_lib['rademacher'] * 1e3:.0f} ms)")
    print(f"NumPy float32 Euler-Maruyama:             {rate(t_np)}  ({t_np * 1e3:.0f} ms)")
    print(f"hand-written lax.scan (Gaussian):         {rate(t_scan)}  ({t_scan * 1e3:.0f} ms)")
    print(f"noise share of the library's Gaussian run: {t_noise / t_lib['gaussian']:.0%} (the same {N * n * D / 1e6:.0f} M normals "
          f"drawn step by step alone: {t_noise * 1e3:.0f} ms)")
    print(f"ratios: Gaussian vs NumPy {t_np / t_lib['gaussian']:.1f}x, Rademacher vs NumPy {t_np / t_lib['rademacher']:.1f}x, "
          f"hand-written scan / library (Gaussian) {t_scan / t_lib['gaussian']:.2f}")
    print(f"agreement, E|y_0|^2: library {mean_sq[0]:.3f}, scan {mean_sq[1]:.3f}, NumPy {mean_sq[2]:.3f}")


if __name__ == "__main__":
    main()
