"""The exact class-conditional Gaussian-mixture noise predictor against SciPy / NumPy, its critical time against
brentq on a dense NumPy Jacobian, and its samples against the Gaussians they must follow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so
from scipy.stats import multivariate_normal

import coupled_diffusion as cd
from coupled_diffusion.diffusion.noise import ModeNoise, VPSchedule
from coupled_diffusion.diffusion.samplers import GuidedEps, guidance_weights, sample


def random_mixture(rng, C=3, D=6):
    means = rng.normal(0, 1.5, (C, D))
    A = rng.normal(0, 0.6, (C, D, D))
    covs = A @ np.swapaxes(A, 1, 2) + 0.05 * np.eye(D)
    w = rng.uniform(0.5, 2.0, C)
    return means, covs, w / w.sum()


def numpy_eps(means, covs, w, z, ab):
    """eps_c = sqrt(1 - ab) C_c^{-1} (z - sqrt(ab) mu_c) and the posterior weights by scipy's logpdf."""
    D = z.size
    Cs = [ab * c + (1 - ab) * np.eye(D) for c in covs]
    eps = np.stack([np.sqrt(1 - ab) * np.linalg.solve(Cc, z - np.sqrt(ab) * m) for Cc, m in zip(Cs, means)])
    logp = np.array([np.log(wc) + multivariate_normal(np.sqrt(ab) * m, Cc).logpdf(z) for wc, m, Cc in zip(w, means, Cs)])
    r = np.exp(logp - logp.max())
    return eps, r / r.sum()


def numpy_top_rate(means, covs, w, s):
    """Top eigenvalue of I + 2 H at z = e^{-s} mean, H the Hessian of log p_s of the Gaussian mixture:
    H = sum_c r_c (-C_c^{-1} + g_c g_c^T) - g g^T with g_c = -C_c^{-1}(z - e^{-s} mu_c), g = sum_c r_c g_c."""
    ab = np.exp(-2 * s)
    D = means.shape[1]
    z = np.exp(-s) * (w @ means)
    Cinv = [np.linalg.inv(ab * c + (1 - ab) * np.eye(D)) for c in covs]
    g = np.stack([-Ci @ (z - np.exp(-s) * m) for Ci, m in zip(Cinv, means)])
    logp = np.array([np.log(wc) + multivariate_normal(np.exp(-s) * m, ab * c + (1 - ab) * np.eye(D)).logpdf(z)
                     for wc, m, c in zip(w, means, covs)])
    r = np.exp(logp - logp.max())
    r /= r.sum()
    gbar = r @ g
    H = sum(rc * (-Ci + np.outer(gc, gc)) for rc, Ci, gc in zip(r, Cinv, g)) - np.outer(gbar, gbar)
    return np.linalg.eigvalsh(np.eye(D) + 2 * H)[-1]


def test_conditional_and_unconditional_predictions_match_scipy():
    rng = np.random.default_rng(0)
    means, covs, w = random_mixture(rng)
    sched = VPSchedule.linear(100)
    model = cd.GaussianMixtureEps(means, covs, w, sched, shape=(2, 3, 1))
    z = rng.normal(0, 1.5, (4, 2, 3, 1))
    t = np.array([3, 30, 60, 99])
    y = np.array([0, 2, 3, 1])  # 3 = the null class: unconditional
    got = np.asarray(model(jnp.asarray(z), jnp.asarray(t), jnp.asarray(y)))
    assert model.num_classes == 3
    for b in range(4):
        ab = float(sched.alphas_cumprod[t[b]])
        eps, r = numpy_eps(means, covs, w, z[b].ravel(), ab)
        want = r @ eps if y[b] == 3 else eps[y[b]]
        np.testing.assert_allclose(got[b].ravel(), want, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(z), jnp.asarray(t))), np.asarray(model(jnp.asarray(z), jnp.asarray(t),
                               jnp.full(4, 3))))


def test_critical_time_matches_brentq_on_a_numpy_jacobian_and_the_one_gaussian_closed_form():
    rng = np.random.default_rng(1)
    means, covs, w = random_mixture(rng, C=3, D=5)
    model = cd.GaussianMixtureEps(means, covs, w, VPSchedule.linear(100), shape=(5, 1, 1))
    for s in (0.1, 0.7, 2.0):
        assert float(model.top_rate(s)) == pytest.approx(numpy_top_rate(means, covs, w, s), rel=1e-8, abs=1e-9)
    grid = np.linspace(0.01, 4.0, 400)
    vals = np.array([numpy_top_rate(means, covs, w, s) for s in grid])
    j = np.flatnonzero(vals >= 0)[-1]  # the last crossing from above
    want = so.brentq(lambda s: numpy_top_rate(means, covs, w, s), grid[j], grid[j + 1], xtol=1e-13)
    assert float(model.critical_time(t_max=4.0, grid_size=64).value) == pytest.approx(want, rel=1e-7)
    # one Gaussian: rate 1 - 2 / (e^{-2s} (lam - 1) + 1), zero at s = log(lam_max - 1) / 2
    one = cd.GaussianMixtureEps(means[:1], covs[:1], [1.0], VPSchedule.linear(100), shape=(5, 1, 1))
    lam = np.linalg.eigvalsh(covs[0])[-1]
    assert lam > 2
    assert float(one.critical_time(t_max=4.0).value) == pytest.approx(0.5 * np.log(lam - 1), rel=1e-8)
    assert float(jax.grad(lambda m: m.critical_time(t_max=4.0).value)(one).eigvals[0, -1]) == pytest.approx(0.5 / (lam - 1), rel=1e-5)


def test_fit_and_guided_sampling_at_w1_reproduce_each_class_gaussian():
    rng = np.random.default_rng(2)
    means = np.array([[2.0, -1.0], [-1.5, 1.0]])
    L = np.array([[[0.5, 0.0], [0.3, 0.2]], [[0.3, 0.0], [-0.2, 0.4]]])
    labels = np.repeat([0, 1], 4000)
    data = means[labels] + np.einsum("nij,nj->ni", L[labels], rng.normal(size=(8000, 2)))
    sched = VPSchedule.linear(200)
    model = cd.GaussianMixtureEps.fit(data.reshape(-1, 1, 2, 1), labels, sched, ridge=0.0)
    np.testing.assert_allclose(np.asarray(model.means), [data[labels == c].mean(0) for c in (0, 1)], atol=1e-12)
    n = 3000
    y = np.repeat([0, 1], n // 2)
    z0 = jax.random.normal(jax.random.key(0), (n, 1, 2, 1))
    x = sample(GuidedEps(model, y, guidance_weights(sched, 0.0)), sched, ModeNoise.isotropic(1), jax.random.key(1), z0,
               method="ddpm").z0
    x = np.asarray(x).reshape(n, 2)
    for c in (0, 1):
        xc = x[y == c]
        cov = L[c] @ L[c].T
        se = np.sqrt(np.diag(cov) / len(xc))
        assert np.all(np.abs(xc.mean(0) - means[c]) < 5 * se + 0.02)  # 0.02: the 200-step discretisation
        np.testing.assert_allclose(np.cov(xc, rowvar=False), cov, atol=0.04)


def test_bad_input_names_the_parameter():
    sched = VPSchedule.linear(10)
    means, covs, w = random_mixture(np.random.default_rng(3), C=2, D=4)
    with pytest.raises(ValueError, match="means"):
        cd.GaussianMixtureEps(means, covs, w, sched, shape=(5, 1, 1))
    with pytest.raises(ValueError, match="covariances"):
        cd.GaussianMixtureEps(means, covs[:, :3], w, sched, shape=(4, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        cd.GaussianMixtureEps(means, covs, [1.0, -1.0], sched, shape=(4, 1, 1))
    with pytest.raises(ValueError, match="semi-definite"):
        cd.GaussianMixtureEps(means, covs - 10 * np.eye(4), w, sched, shape=(4, 1, 1))
    with pytest.raises(ValueError, match="at least two images"):
        cd.GaussianMixtureEps.fit(np.zeros((3, 2, 2, 1)), np.array([0, 0, 1]), sched)
    with pytest.raises(ValueError, match="ridge"):
        cd.GaussianMixtureEps.fit(np.zeros((4, 2, 2, 1)), np.array([0, 0, 1, 1]), sched, ridge=-1.0)
    model = cd.GaussianMixtureEps(means, covs, w, sched, shape=(4, 1, 1))
    with pytest.raises(ValueError, match="`z`"):
        model(jnp.zeros((2, 2, 2, 1)), jnp.zeros(2, jnp.int32))
