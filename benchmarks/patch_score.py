"""The equivariant patch score (issue 19) against a plain NumPy loop over pixel positions, side by side.

Workload: 2-D images of side 16 with k = 2 coupled modalities (symmetric M, beta = 1, g = 0.3,
sigma_W^2 = 2), 64 training images, patches of side 5, one score evaluation at t = 0.5 for a batch of
32 noisy states: every pixel's noisy patch against all 64 x 256 = 16,384 training patches.

- ours: `cd.PatchScore.of(..., equivariant=True)`, jitted, float32 (an online log-sum-exp over the
  bank in chunks of 1024, the default).
- baseline: NumPy float32, a Python loop over the 256 positions; at each, the 32 noisy patches
  against the whole bank as one matrix product (the Q^-1-weighted inner products and the bank's
  norms precomputed once, outside the timing), a stable softmax, and the weighted centres. E and
  Q come from `cd.transition` once.

The two outputs are checked to agree before timing; medians of 3 rounds x `--repeats` calls,
alternating blocks (`models.median_times`); the ratio is baseline time / ours.

    python benchmarks/patch_score.py [--repeats 5]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from models import median_times  # noqa: E402  (also opts in to the CPU tuning)

import coupled_diffusion as cd  # noqa: E402

SIDE, K, N, P, BATCH, T = 16, 2, 64, 5, 32, 0.5


def numpy_baseline(images, index, E, Q):
    """A closure evaluating the patch score pixel by pixel with NumPy, bank quantities precomputed."""
    Qi = np.linalg.inv(Q).astype(np.float32)
    flat = images.reshape(N, K, -1)
    bank = np.moveaxis(flat[:, :, index], 2, 0).reshape(-1, K, P * P)  # (positions x n, k, P^2)
    mean_bank = np.einsum("ij,bjp->bip", E, bank)  # E p_j
    weighted = np.einsum("ij,bjp->bip", Qi, mean_bank).reshape(len(bank), -1)  # (Q^-1 (x) I) E p_j
    half_norm = 0.5 * np.sum(mean_bank.reshape(len(bank), -1) * weighted, axis=1)
    centres = mean_bank[:, :, P * P // 2]  # E c_j, (bank, k)

    def score(z):
        out = np.empty_like(z)
        for x in range(SIDE * SIDE):
            u = z[:, :, index[x]].reshape(len(z), -1)  # (batch, k P^2)
            logits = u @ weighted.T - half_norm
            logits -= logits.max(axis=1, keepdims=True)
            w = np.exp(logits)
            w /= w.sum(axis=1, keepdims=True)
            out[:, :, x] = (w @ centres - z[:, :, x]) @ Qi.T
        return out

    return score


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ou = cd.CoupledOU.symmetric(1.0, 0.3, 2.0)
    rng = np.random.default_rng(0)
    images = np.sign(rng.standard_normal((N, K, SIDE, SIDE))).astype(np.float32)
    z = rng.standard_normal((BATCH, K, SIDE * SIDE)).astype(np.float32)
    score = cd.PatchScore.of(ou, images, P)
    ours = jax.jit(lambda t, z: score(t, z))
    E, Q = (np.asarray(a, np.float64) for a in cd.transition(jnp.asarray(ou.M), ou.sigma_w2, T))
    theirs = numpy_baseline(images, cd.patch_indices(SIDE, P, 2), E.astype(np.float32), Q)
    zj = jnp.asarray(z)
    got, want = np.asarray(ours(T, zj)), theirs(z)
    err = float(np.abs(got - want).max())
    assert err < 1e-3 * float(np.abs(want).max()), f"the two scores disagree: max |diff| {err}"
    times = median_times({"ours": lambda: ours(T, zj).block_until_ready(), "numpy": lambda: theirs(z)}, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; 2-D side {SIDE}, k = {K}, {N} images, patch {P}, {BATCH} states, "
          f"{N * SIDE * SIDE} bank patches; outputs agree to {err:.2e}")
    for name, t in times.items():
        print(f"  {name:8s} {t * 1e3:8.1f} ms")
    print(f"ratio numpy / ours: {times['numpy'] / times['ours']:.2f}x")


if __name__ == "__main__":
    main()
