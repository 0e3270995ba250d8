"""Figure 4 phase diagram t_S(g, theta) on a 256 x 256 grid: coupled_diffusion vs SciPy.

Both sides solve the same equations the same way: kappa(t) from the closed-form moments
(Van Loan block exponential for Q), a 64-step grid scan for the last crossing of
kappa = 1, then a bracketed root solve (JAX: jit + vmap + optimistix Newton; SciPy:
`scipy.linalg.expm` + `brentq` per point, the natural SciPy program). The SciPy baseline
runs on a random subset of points (it would take minutes on the full grid); throughput
is points/s, reported as a median of repeats, with the agreement of the two on the subset.

    python benchmarks/phase_diagram.py [--n 256] [--subset 256] [--repeats 3]
"""

import argparse
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402
import scipy.linalg as sl  # noqa: E402
import scipy.optimize as so  # noqa: E402

import coupled_diffusion as cd  # noqa: E402
from coupled_diffusion.experiments.figures import phase_diagram  # noqa: E402

cd.tune_cpu()  # opt in to the CPU tuning (the library's import changes nothing), before JAX starts

BETA, SW2, VAR, T_MAX, GRID = 1.0, 2.0, 1.0, 10.0, 64


def scipy_transition(M, t):
    k = M.shape[0]
    H = np.block([[M, SW2 * np.eye(k)], [np.zeros((k, k)), -M.T]]) * t
    F = sl.expm(H)
    E = F[:k, :k]  # e^{Mt} is the top-left block
    return E, F[:k, k:] @ E.T


def scipy_kappa(M, gram, E, Q):
    C = VAR * E @ E.T + Q
    G = E @ gram @ E.T
    return SW2 * np.trace(np.linalg.solve(C @ M @ C + SW2 * C, G))


def scipy_speciation(g, theta):
    M = np.array([[-BETA, 0.0], [g, -BETA]])
    c = np.cos(theta)
    gram = np.array([[1.0, c], [c, 1.0]])
    dt = T_MAX / GRID
    E_step, Q_step = scipy_transition(M, dt)
    E, Q = np.eye(2), np.zeros((2, 2))
    F = []
    for _ in range(GRID + 1):
        F.append(scipy_kappa(M, gram, E, Q) - 1.0)
        E, Q = E_step @ E, Q_step + E_step @ Q @ E_step.T
    F = np.array(F)
    pos = np.nonzero(F >= 0)[0]
    if len(pos) == 0 or pos[-1] == GRID:
        return np.nan
    j = pos[-1]
    f = lambda t: scipy_kappa(M, gram, *scipy_transition(M, t)) - 1.0
    return so.brentq(f, j * dt, (j + 1) * dt, xtol=1e-12, rtol=1e-12)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--subset", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    n = args.n

    t0 = time.perf_counter()
    d = phase_diagram(n, n, t_max=T_MAX)  # includes compilation
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        d = phase_diagram(n, n, t_max=T_MAX)
        times.append(time.perf_counter() - t0)
    jax_pps = n * n / statistics.median(times)

    rng = np.random.default_rng(0)
    idx = rng.choice(n * n, size=args.subset, replace=False)
    ti, gi = np.unravel_index(idx, (n, n))
    stimes, ref = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = np.array([scipy_speciation(d["g"][b], d["theta"][a]) for a, b in zip(ti, gi)])
        stimes.append(time.perf_counter() - t0)
    scipy_pps = args.subset / statistics.median(stimes)
    ours = d["t_s"][ti, gi]
    same_nan = np.array_equal(np.isnan(ours), np.isnan(ref))
    err = np.nanmax(np.abs(ours - ref) / np.abs(ref))

    print(f"grid {n} x {n} = {n * n} points, t_max={T_MAX}, {GRID}-step bracket, devices={jax.devices()}")
    print(f"coupled_diffusion (jit+vmap, float64): {jax_pps:,.0f} points/s  "
          f"(median of {args.repeats}; first call incl. compile {compile_s:.1f} s)")
    print(f"SciPy expm + brentq per point:          {scipy_pps:,.0f} points/s  (median of {args.repeats}, {args.subset} random points)")
    print(f"ratio: {jax_pps / scipy_pps:,.0f}x   agreement on subset: same no-speciation set={same_nan}, max rel diff={err:.1e}")


if __name__ == "__main__":
    main()
