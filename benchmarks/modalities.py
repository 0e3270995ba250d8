"""Per-eigenmode speciation and collapse times over a grid of couplings (issue 20), against a NumPy loop, side by side.

Workload: the ring of k = 8 modalities (beta = 1, sigma_W^2 = 2, sigma^2 = 1), equicorrelated class means
(m^2 = 2, rho = 0.5), 1024 couplings across the stability interval; for each: the eigendecomposition of M,
the principal axes of the projected Gram matrix inside the degenerate eigenspaces (the ring's spectrum is
pairwise degenerate), and every mode's closed-form speciation time (eq 65-66) and collapse time (eq 77-78).

- ours: `cd.mode_hierarchy` under `jax.jit(jax.vmap(...))` over the couplings, float64.
- baseline: NumPy float64, a Python loop over the couplings doing the same steps (`np.linalg.eigh`, a
  grouping of equal eigenvalues and an `eigh` of each group's projected Gram, the closed forms).

The two outputs are checked to agree before timing; medians of 3 rounds x `--repeats` calls,
alternating blocks (`models.median_times`); the ratio is baseline time / ours.

    python benchmarks/modalities.py [--repeats 5] [--k 8] [--n-g 1024]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from models import median_times  # noqa: E402  (also opts in to the CPU tuning)

import coupled_diffusion as cd  # noqa: E402

BETA, SW2, SIGMA2, M2, RHO, ALPHA = 1.0, 2.0, 1.0, 2.0, 0.5, 0.5


def numpy_baseline(A, gram, gs):
    """A closure computing (speciation, collapse) times `(n_g, k)` coupling by coupling with NumPy."""
    k = A.shape[0]

    def run():
        ts = np.empty((len(gs), k))
        tc = np.empty((len(gs), k))
        for n, g in enumerate(gs):
            lam, V = np.linalg.eigh(-BETA * np.eye(k) + g * A)
            lam, V = lam[::-1], V[:, ::-1]
            start = 0
            while start < k:  # equal eigenvalues: rotate to the projected Gram's principal axes
                stop = start + 1
                while stop < k and abs(lam[stop] - lam[start]) <= 256 * np.finfo(float).eps * max(1.0, abs(lam).max()):
                    stop += 1
                if stop - start > 1:
                    Vb = V[:, start:stop]
                    V[:, start:stop] = Vb @ np.linalg.eigh(Vb.T @ gram @ Vb)[1]
                start = stop
            m2 = np.einsum("ij,ik,kj->j", V, gram, V)
            B = SIGMA2 + SW2 / (2 * lam)
            a = SW2 / (2 * np.abs(lam) * (m2 + np.sqrt(m2**2 + B**2)))
            ok = (lam < 0) & (SIGMA2 < SW2 / np.abs(lam)) & (m2 > 0) & (a < 1)
            ts[n] = np.where(ok, np.log(a) / (2 * lam), np.nan)
            tau = -2 * lam
            tc[n] = np.log1p(SIGMA2 / SW2 * tau / np.expm1(2 * ALPHA)) / tau
        return ts, tc

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--n-g", type=int, default=1024)
    args = parser.parse_args()
    k = args.k
    A = cd.adjacency("ring", k)
    gram = M2 * ((1 - RHO) * np.eye(k) + RHO * np.ones((k, k)))
    lo, hi = (float(v) for v in cd.stability_interval("ring", k, BETA))
    gs = np.linspace(0.95 * lo, 0.95 * hi, args.n_g)
    data = cd.TwoClassMixture(gram, np.full(k, SIGMA2))

    def one(g):
        h = cd.mode_hierarchy(cd.CoupledOU(-BETA * jnp.eye(k) + g * jnp.asarray(A), SW2), data, alpha=ALPHA)
        return h.speciation.value, h.collapse.value

    ours = jax.jit(jax.vmap(one))
    gj = jnp.asarray(gs)
    theirs = numpy_baseline(A, gram, gs)
    (s1, c1), (s2, c2) = ours(gj), theirs()
    # the degenerate pairs' two modes may come in either order: compare each coupling's sorted times
    err = max(float(np.nanmax(np.abs(np.sort(np.nan_to_num(np.asarray(x), nan=-1), 1) - np.sort(np.nan_to_num(y, nan=-1), 1))))
              for x, y in ((s1, s2), (c1, c2)))
    assert err < 1e-9, f"the two computations disagree: max |diff| {err}"
    times = median_times({"ours": lambda: jax.block_until_ready(ours(gj)), "numpy": theirs}, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; ring of k = {k}, {args.n_g} couplings, per-mode speciation + collapse "
          f"(float64); outputs agree to {err:.2e}")
    for name, t in times.items():
        print(f"  {name:8s} {t * 1e3:8.2f} ms")
    print(f"ratio numpy / ours: {times['numpy'] / times['ours']:.2f}x")


if __name__ == "__main__":
    main()
