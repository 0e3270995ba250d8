"""Closed-form patch models and criticality (issue 19): the Gaussian / two-cluster patch scores and their exact
Fourier growth rates against an independent NumPy construction (dense Jacobian, `np.linalg.eigvals`), the jvp
rates against the exact ones, the P = L limits against the population score and the speciation time, the
critical time against a closed form, correlation lengths of synthetic fields, the Ginzburg-Landau fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import E_Q, anisotropic_M, symmetric_M

import coupled_diffusion as cd

OU_SYM, OU_ANI = cd.CoupledOU.symmetric(1.0, 0.4, 2.0), cd.CoupledOU.anisotropic(1.0, 0.8, 2.0)
OU_1 = cd.CoupledOU(jnp.array([[-1.0]]), 2.0)


def offsets(patch, ndim):
    r = range(-(patch // 2), patch // 2 + 1)
    return [(o,) for o in r] if ndim == 1 else [(a, b) for a in r for b in r]


def numpy_mixture(M, sw2, t, means, cov, weights):
    """S_t^{-1} and the noisy means of a Gaussian-mixture patch model, from SciPy's E, Q."""
    E, Q = E_Q(M, sw2, t)
    k, n_pix = means.shape[1:]
    EI = np.kron(E, np.eye(n_pix))
    S = EI @ cov @ EI.T + np.kron(Q, np.eye(n_pix))
    return np.linalg.inv(S), np.stack([EI @ m.reshape(-1) for m in means]), np.log(weights)


def numpy_patch_grad_hess(Si, mu, logw, u):
    """Gradient and Hessian of log sum_c w_c N(u; mu_c, S) (flat u), written out: the posterior-covariance form."""
    r = u[None] - mu
    v = r @ Si
    logits = logw - 0.5 * np.sum(r * v, 1)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    grad = -(w @ v)
    mbar = w @ mu
    cov_m = (mu * w[:, None]).T @ mu - np.outer(mbar, mbar)
    return grad, -Si + Si @ cov_m @ Si


def numpy_field(images_shape, patch):
    """(site list, function: image (k, *shape) -> flat patch at a site, flat (a, site) index of a patch entry)."""
    shape = images_shape
    sites = list(np.ndindex(*shape))
    offs = offsets(patch, len(shape))

    def patch_sites(site):
        return [tuple((p + o) % s for p, o, s in zip(site, off, shape, strict=True)) for off in offs]

    return sites, patch_sites


def numpy_score_and_drift_jacobian(M, sw2, t, means, cov, weights, z, patch, shape):
    """The patch score at every pixel of state `z` (k, *shape) and the dense Jacobian of the reverse drift there."""
    k = z.shape[0]
    Si, mu, logw = numpy_mixture(M, sw2, t, means, cov, weights)
    sites, patch_sites = numpy_field(shape, patch)
    d = len(sites)
    flat = {s: i for i, s in enumerate(sites)}
    n_pix = len(patch_sites(sites[0]))
    centre = n_pix // 2
    score = np.zeros((k, d))
    J = np.zeros((k * d, k * d))
    for site in sites:
        ps = patch_sites(site)
        u = np.concatenate([[z[(a,) + p] for p in ps] for a in range(k)])
        g, H = numpy_patch_grad_hess(Si, mu, logw, u)
        x = flat[site]
        for a in range(k):
            score[a, x] = g[a * n_pix + centre]
            for b in range(k):
                for j, p in enumerate(ps):
                    J[a * d + x, b * d + flat[p]] += H[a * n_pix + centre, b * n_pix + j]
    drift_J = -np.kron(M, np.eye(d)) + sw2 * J
    return score, drift_J


def random_model(rng, k, patch, ndim, clusters):
    n_pix = patch**ndim
    A = rng.standard_normal((k * n_pix, k * n_pix)) * 0.4
    cov = A @ A.T + 0.05 * np.eye(k * n_pix)
    means = rng.standard_normal((clusters, k, n_pix)) * 0.8
    weights = rng.dirichlet(np.ones(clusters)) * 0.8 + 0.2 / clusters
    return means, cov, weights / weights.sum()


@pytest.mark.parametrize("ndim,side,patch,clusters", [(1, 8, 3, 1), (1, 7, 5, 2), (2, 5, 3, 1), (2, 5, 3, 2)])
def test_gaussian_patch_score_and_its_exact_rates_match_numpy(ndim, side, patch, clusters):
    """The score pixel by pixel, and the rates against the eigenvalues of the dense drift Jacobian at the mean state."""
    rng = np.random.default_rng(10 * ndim + side + clusters)
    for ou, M in ((OU_SYM, symmetric_M(1.0, 0.4)), (OU_ANI, anisotropic_M(1.0, 0.8))):
        means, cov, weights = random_model(rng, 2, patch, ndim, clusters)
        s = cd.GaussianPatchScore.of(ou, means, cov, side=side, ndim=ndim, weights=weights)
        t = 0.4
        z = rng.standard_normal((2,) + (side,) * ndim)
        want, _ = numpy_score_and_drift_jacobian(M, 2.0, t, means, cov, weights, z, patch, (side,) * ndim)
        got = s(t, jnp.asarray(z.reshape(2, -1)))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-10)
        # the mean state: E(t) times the per-modality average of the mixture's mean patch
        E, _ = E_Q(M, 2.0, t)
        zbar = E @ np.einsum("c,caj->a", weights, means) / patch**ndim
        zc = np.broadcast_to(zbar.reshape((2,) + (1,) * ndim), (2,) + (side,) * ndim)
        _, DJ = numpy_score_and_drift_jacobian(M, 2.0, t, means, cov, weights, zc, patch, (side,) * ndim)
        want_eigs = np.sort(np.linalg.eigvals(DJ).real)
        rates = cd.mode_growth_rates(ou, s, t)
        np.testing.assert_allclose(np.sort(np.asarray(rates.rates).ravel()), want_eigs, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("ndim,side,patch", [(1, 8, 3), (2, 5, 3)])
def test_empirical_patch_rates_match_numpy_as_a_zero_covariance_mixture(ndim, side, patch):
    """The equivariant empirical patch score is the mixture of all bank patches with covariance 0."""
    rng = np.random.default_rng(7 + ndim)
    images = rng.standard_normal((3, 2) + (side,) * ndim)
    s = cd.PatchScore.of(OU_ANI, images, patch, chunk=5)
    _, patch_sites = numpy_field((side,) * ndim, patch)
    bank = np.stack([np.stack([[img[(a,) + p] for p in patch_sites(site)] for a in range(2)])
                     for img in images for site in np.ndindex(*(side,) * ndim)])
    t = 0.5
    M = anisotropic_M(1.0, 0.8)
    E, _ = E_Q(M, 2.0, t)
    zc = np.broadcast_to((E @ images.mean(axis=tuple(i for i in range(images.ndim) if i != 1))).reshape((2,) + (1,) * ndim),
                         (2,) + (side,) * ndim)
    w = np.full(bank.shape[0], 1.0 / bank.shape[0])
    _, DJ = numpy_score_and_drift_jacobian(M, 2.0, t, bank, np.zeros((2 * patch**ndim,) * 2), w, zc, patch, (side,) * ndim)
    rates = cd.mode_growth_rates(OU_ANI, s, t)
    np.testing.assert_allclose(np.sort(np.asarray(rates.rates).ravel()), np.sort(np.linalg.eigvals(DJ).real), rtol=1e-8, atol=1e-9)


def test_jvp_rates_equal_the_exact_rates_for_both_patch_models_and_a_mode_subset():
    rng = np.random.default_rng(3)
    side, patch = 5, 3
    images = rng.standard_normal((4, 2, side, side))
    ts = jnp.array([0.3, 1.1])
    for s in (cd.GaussianPatchScore.fit(OU_SYM, images, patch, clusters=2), cd.PatchScore.of(OU_SYM, images, patch)):
        exact = cd.mode_growth_rates(OU_SYM, s, ts)
        jvp = cd.mode_growth_rates(OU_SYM, s, ts, method="jvp", batch=17)
        assert exact.matrix.shape == jvp.matrix.shape == (2, side * side, 2, 2)
        np.testing.assert_allclose(np.asarray(jvp.matrix), np.asarray(exact.matrix), rtol=1e-9, atol=1e-10)
        modes = np.array([[0, 1], [2, -1], [2, 2]])
        sub = cd.mode_growth_rates(OU_SYM, s, ts, method="jvp", modes=modes)
        pick = [int(np.flatnonzero((np.asarray(exact.wavenumbers) % side == m % side).all(1))[0]) for m in modes]
        np.testing.assert_allclose(np.asarray(sub.rates), np.asarray(exact.rates[:, pick]), rtol=1e-9, atol=1e-10)
        back = cd.mode_growth_rates(OU_SYM, s, ts, method="vjp", modes=modes)  # reverse mode: the same symbol
        np.testing.assert_allclose(np.asarray(back.matrix), np.asarray(sub.matrix), rtol=1e-9, atol=1e-10)
    # a batch of states: the symbol averaged over them (state-independent for the Gaussian model)
    g1 = cd.GaussianPatchScore.fit(OU_SYM, images, patch)
    zs = jnp.asarray(rng.standard_normal((3, 2, side * side)))
    np.testing.assert_allclose(np.asarray(cd.mode_growth_rates(OU_SYM, g1, 0.5, method="jvp", z=zs).matrix),
                               np.asarray(cd.mode_growth_rates(OU_SYM, g1, 0.5).matrix), rtol=1e-9, atol=1e-10)
    g2 = cd.GaussianPatchScore.fit(OU_SYM, images, patch, clusters=2)
    each = [cd.mode_growth_rates(OU_SYM, g2, 0.5, method="jvp", z=z, modes=modes).matrix for z in zs]
    np.testing.assert_allclose(np.asarray(cd.mode_growth_rates(OU_SYM, g2, 0.5, method="jvp", z=zs, modes=modes).matrix),
                               np.mean(np.asarray(each), 0), rtol=1e-9, atol=1e-10)


def test_full_size_two_cluster_patch_model_is_the_population_score_and_t_c_is_the_speciation_time():
    side, ndim = 5, 2
    d = side**ndim
    m, var = np.array([0.5, 0.3]), np.array([0.8, 0.6])
    means = np.stack([np.outer(m, np.ones(d)), -np.outer(m, np.ones(d))])
    cov = np.kron(np.diag(var), np.eye(d))
    mix = cd.TwoClassMixture(np.outer(m, m), var)
    ou = cd.CoupledOU.symmetric(1.0, 0.3, 2.0)
    z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, d)))
    s = cd.GaussianPatchScore.of(ou, means, cov, side=side, ndim=ndim)
    pop = cd.PopulationScore.of(ou, mix, jnp.asarray(np.outer(m, np.ones(d))))
    np.testing.assert_allclose(np.asarray(s(0.7, z)), np.asarray(pop(0.7, z)), rtol=1e-10, atol=1e-12)

    def t_c(scale):
        model = cd.GaussianPatchScore.of(ou, means * scale, cov, side=side, ndim=ndim)
        return cd.critical_time(lambda t, a: cd.mode_growth_rates(ou, a, t).top, model, t_min=1e-2, t_max=6.0).value

    def t_s(scale):
        return cd.speciation_time(ou, cd.TwoClassMixture(np.outer(m, m) * scale**2, var), dim=d, t_max=6.0).value

    np.testing.assert_allclose(t_c(1.0), t_s(1.0), rtol=1e-9)
    np.testing.assert_allclose(jax.grad(t_c)(1.0), jax.grad(t_s)(1.0), rtol=1e-7)


def stationary_covariance(side, amplitude, mass):
    """A 1-D stationary patch covariance (P = L, centred offsets) with the lattice OZ spectrum
    lambda_q = amplitude / (mass + qhat^2): `(lambda, C)`."""
    n = np.fft.fftfreq(side) * side
    lam = amplitude / (mass + 4 * np.sin(np.pi * n / side) ** 2)
    c = np.real(np.fft.ifft(lam))
    off = np.arange(side) - side // 2
    return lam, np.array([[c[(b - a) % side] for b in off] for a in off])


def test_gaussian_critical_time_has_the_closed_form_and_its_gradient():
    """k = 1, P = L, a stationary covariance with spectrum lambda_q: mode q's rate is beta - sigma^2 / (e^{-2t} lambda_q
    + v (1 - e^{-2t})), v = sigma^2 / 2 beta, so t_c = log((lambda_max - v) / v) / 2 for beta = 1, sigma^2 = 2."""
    side = 9
    lam, C = stationary_covariance(side, 3.0, 0.2)

    def t_c(scale):
        s = cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, side)), C * scale, side=side, ndim=1)
        return cd.critical_time(lambda t, a: cd.mode_growth_rates(OU_1, a, t).top, s, t_min=1e-2, t_max=5.0).value

    s = cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, side)), C, side=side, ndim=1)
    t = 0.5
    rates = cd.mode_growth_rates(OU_1, s, t)
    np.testing.assert_allclose(np.asarray(rates.rates[:, 0]), 1 - 2 / (np.exp(-2 * t) * lam + 1 - np.exp(-2 * t)), rtol=1e-10)
    np.testing.assert_allclose(t_c(1.0), 0.5 * np.log(lam.max() - 1.0), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(t_c)(1.0), 0.5 * lam.max() / (lam.max() - 1.0), rtol=1e-7)
    assert int(rates.top_mode) == 0 and float(rates.top) == pytest.approx(float(rates.rates[0, 0]))


def oz_fields(rng, n, side, ndim, xi):
    """Gaussian fields with the lattice Ornstein-Zernike spectrum 1 / (xi^-2 + qhat^2): exact second-moment xi."""
    q = 2 * np.pi * np.fft.fftfreq(side)
    qs = np.meshgrid(*([q] * ndim), indexing="ij")
    S = 1.0 / (xi**-2 + sum(4 * np.sin(qq / 2) ** 2 for qq in qs))
    w = rng.standard_normal((n,) + (side,) * ndim)
    axes = tuple(range(1, 1 + ndim))
    return np.real(np.fft.ifftn(np.sqrt(S) * np.fft.fftn(w, axes=axes), axes=axes)) + 3.0


@pytest.mark.parametrize("ndim,side,xi", [(1, 64, 4.0), (2, 24, 2.5)])
def test_correlation_length_of_an_ornstein_zernike_field_and_its_jackknife_error(ndim, side, xi):
    rng = np.random.default_rng(ndim)
    est = [cd.correlation_length(oz_fields(rng, 400, side, ndim, xi), ndim=ndim) for _ in range(30)]
    values = np.array([float(e.xi) for e in est])
    errs = np.array([float(e.stderr) for e in est])
    assert abs(values.mean() - xi) < 3 * values.std() / np.sqrt(len(values)) + 0.02 * xi
    assert 0.6 < errs.mean() / values.std() < 1.6  # the jackknife error is the spread of repeated estimates
    covered = np.mean(np.abs(values - xi) < 1.96 * errs)
    assert covered > 0.8
    C = cd.correlation_function(oz_fields(rng, 50, side, ndim, xi), ndim=ndim)
    assert C.shape == (side,) * ndim and float(C[(0,) * ndim]) == pytest.approx(float(C.max()))


def test_uncorrelated_fields_have_no_positive_correlation_length():
    rng = np.random.default_rng(0)
    est = cd.correlation_length(rng.standard_normal((2000, 32)), ndim=1)
    assert abs(float(est.s0 / est.s1) - 1) < 0.15  # white noise: S(0) = S(q_1), xi^2 near 0 (either sign)
    anti = np.tile(np.array([1.0, -1.0] * 16), (100, 1)) * rng.standard_normal((100, 1))
    bad = cd.correlation_length(anti, ndim=1)
    assert not bool(bad.valid) and np.isnan(float(bad.xi))


def test_ginzburg_landau_fit_recovers_mass_and_stiffness():
    side = 16
    wn = cd.fourier_modes(side, 2)
    qhat2 = np.sum(4 * np.sin(np.pi * wn / side) ** 2, -1)
    r = np.array([0.5, 0.1, -0.2])
    c = 1.3
    rates = -(r[:, None] + c * qhat2[None]) - 0.02 * qhat2[None] ** 2  # GL plus a small quartic term
    mr = cd.ModeRates(jnp.asarray(wn), jnp.zeros((3, side * side, 1, 1), complex), jnp.asarray(rates)[..., None], side)
    fit = cd.ginzburg_landau_fit(mr, shells=3)
    np.testing.assert_allclose(np.asarray(fit.r), r, atol=2e-3)
    np.testing.assert_allclose(np.asarray(fit.c), c, rtol=0.05)
    np.testing.assert_allclose(np.asarray(fit.xi), np.sqrt(np.asarray(fit.c) / np.abs(np.asarray(fit.r))), rtol=1e-12)
    assert fit.modes == 1 + 4 + 4


def test_reverse_sampling_of_a_full_gaussian_model_reproduces_the_correlation_length_of_its_marginals():
    """P = L Gaussian: the reverse SDE under the exact score has the forward marginals, whose spectrum is
    e^{-2t} lambda_q + 1 - e^{-2t}: the measured xi(t) must match the one computed from it."""
    side = 15
    lam, C = stationary_covariance(side, 6.0, 0.15)
    s = cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, side)), C, side=side, ndim=1)
    T, steps = 4.0, 400
    save = jnp.array([2.0, 1.0, 0.4])
    rng = np.random.default_rng(0)
    spec_T = np.exp(-2 * T) * lam + 1 - np.exp(-2 * T)  # an exact draw from the marginal at T
    zT = np.real(np.fft.ifft(np.sqrt(spec_T) * np.fft.fft(rng.standard_normal((3000, 1, side)), axis=-1), axis=-1))
    zs, _ = cd.reverse_sde(OU_1, s, jnp.asarray(zT), key=jax.random.key(0), t_start=T, t_end=0.0, n_steps=steps, save_at=save)
    zs = np.asarray(zs)
    for i, t in enumerate(np.asarray(save)):
        spec = np.exp(-2 * t) * lam + 1 - np.exp(-2 * t)
        want = np.sqrt((spec[0] / spec[1] - 1) / (4 * np.sin(np.pi / side) ** 2))
        got = cd.correlation_length(zs[i][:, 0, :], ndim=1)
        assert abs(float(got.xi) - want) < 3.5 * float(got.stderr) + 0.03 * want, (t, float(got.xi), float(got.stderr), want)


def test_bad_input_gives_clear_errors_and_result_codes():
    s = cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, 3)), 0.1 * np.eye(3), side=9, ndim=1)  # weakly correlated: no instability
    rate = lambda t, a: cd.mode_growth_rates(OU_1, a, t).top  # noqa: E731
    sol = cd.critical_time(rate, s, t_min=1e-2, t_max=5.0, throw=False)
    assert sol.result == cd.RESULTS.no_critical_point and np.isnan(float(sol.value))
    with pytest.raises(ValueError, match="No critical point"):
        cd.critical_time(rate, s, t_min=1e-2, t_max=5.0)
    strong = cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, 3)), 50 * np.ones((3, 3)), side=9, ndim=1)
    assert cd.critical_time(rate, strong, t_min=1e-2, t_max=0.5, throw=False).result == cd.RESULTS.critical_beyond_t_max
    with pytest.raises(ValueError, match="t_min"):
        cd.critical_time(rate, s, t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="cov"):
        cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, 3)), -np.eye(3), side=9, ndim=1)
    with pytest.raises(ValueError, match="weights"):
        cd.GaussianPatchScore.of(OU_1, jnp.zeros((2, 1, 3)), np.eye(3), side=9, ndim=1, weights=[0.7, 0.7])
    with pytest.raises(ValueError, match="odd side"):
        cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, 4)), np.eye(4), side=9, ndim=1)
    with pytest.raises(ValueError, match="side"):
        cd.GaussianPatchScore.of(OU_1, jnp.zeros((1, 5)), np.eye(5), side=3, ndim=1)
    with pytest.raises(ValueError, match="patch"):
        cd.GaussianPatchScore.fit(OU_1, np.zeros((2, 1, 6)), 4)
    with pytest.raises(ValueError, match="empty"):
        cd.GaussianPatchScore.fit(OU_1, np.zeros((0, 1, 6)), 3)
    with pytest.raises(ValueError, match="two clusters"):
        cd.GaussianPatchScore.fit(OU_1, np.ones((3, 1, 6)), 3, clusters=2)
    with pytest.raises(ValueError, match="clusters"):
        cd.GaussianPatchScore.fit(OU_1, np.ones((3, 1, 6)), 3, clusters=3)
    with pytest.raises(ValueError, match="t"):
        cd.mode_growth_rates(OU_1, s, 0.0)
    with pytest.raises(ValueError, match="exact"):
        cd.mode_growth_rates(OU_1, lambda t, z: -z, 0.5, method="exact", side=9, ndim=1)
    with pytest.raises(ValueError, match="`z`"):
        cd.mode_growth_rates(OU_1, lambda t, z: -z, 0.5, side=9, ndim=1)
    with pytest.raises(ValueError, match="samples"):
        cd.correlation_length(np.zeros((1, 8)), ndim=1)
    with pytest.raises(ValueError, match="fields"):
        cd.correlation_length(np.zeros((5, 8)), ndim=2)
    with pytest.raises(ValueError, match="shells"):
        cd.ginzburg_landau_fit(cd.mode_growth_rates(OU_1, s, 0.5), shells=1)


def test_a_plain_score_function_gets_jvp_rates_with_explicit_geometry():
    """A linear convolutional 'network' score s(z) = -z + a (z_{x+1} + z_{x-1}): symbol -1 + 2 a cos q."""
    a = 0.3

    def score(t, z):
        return -z + a * (jnp.roll(z, 1, -1) + jnp.roll(z, -1, -1))

    side = 10
    rates = cd.mode_growth_rates(OU_1, score, 0.7, side=side, ndim=1, z=jnp.zeros((1, side)))
    q = 2 * np.pi * cd.fourier_modes(side, 1)[:, 0] / side
    np.testing.assert_allclose(np.asarray(rates.rates[:, 0]), 1 + 2 * (-1 + 2 * a * np.cos(q)), rtol=1e-12, atol=1e-12)


def test_a_vp_noise_predictor_is_the_score_of_the_equivalent_ou_process():
    """EmpiricalEps (the exact VP denoiser of a point set) through VPScore against EmpiricalScore of the OU process
    M = -I, sigma_W^2 = 2 at the timesteps' OU times s_n = -log(alphabar_n) / 2; then the same jvp rates."""
    rng = np.random.default_rng(4)
    H = W = 4
    points = rng.uniform(-1, 1, (6, H, W, 2)).astype(np.float32)
    sched = cd.VPSchedule.linear(50)
    vp = cd.VPScore.of(cd.EmpiricalEps(points, sched, cd.ModeNoise.isotropic(2)), sched, shape=(H, W, 2))
    ref = cd.EmpiricalScore.of(vp.ou, jnp.asarray(np.moveaxis(points, -1, 1).reshape(6, 2, H * W), jnp.float64))
    z = jnp.asarray(rng.standard_normal((3, 2, H * W)))
    for n in (5, 20, 45):
        s = float(vp.ou_time(n))
        assert int(vp.timestep(s)) == n
        np.testing.assert_allclose(np.asarray(vp(s, z)), np.asarray(ref(s, z)), rtol=2e-5, atol=2e-5)
        zbar = jnp.exp(-s) * jnp.asarray(points.mean(0).T.reshape(2, -1), jnp.float64)
        a = cd.mode_growth_rates(vp.ou, vp, s, z=zbar, side=H, ndim=2, modes=[[0, 0], [0, 1], [1, 1]])
        b = cd.mode_growth_rates(vp.ou, ref, s, z=zbar, side=H, ndim=2, modes=[[0, 0], [0, 1], [1, 1]])
        np.testing.assert_allclose(np.asarray(a.rates), np.asarray(b.rates), rtol=1e-4, atol=1e-4)
    # the experiment's network path (reverse-mode probes, mean state sqrt(alphabar) x_mean) on the same exact denoiser
    from coupled_diffusion.experiments.patterns import network_criticality

    x_mean = points.mean(0).T.reshape(2, -1)
    net = network_criticality(vp.eps_fn, sched, x_mean, shape=(H, W, 2), shells=2, n_times=4, gl_shells=2)
    for n, top in zip(net["timesteps"], net["top"], strict=True):
        s = float(vp.ou_time(int(n)))
        want = cd.mode_growth_rates(vp.ou, ref, s, z=jnp.exp(-s) * jnp.asarray(x_mean, jnp.float64), side=H, ndim=2,
                                    modes=[[0, 0], [0, 1], [1, 0], [0, -1], [-1, 0]]).top
        np.testing.assert_allclose(top, float(want), rtol=1e-4, atol=1e-4)
    from coupled_diffusion.plotting import plot_network_rates

    assert len(plot_network_rates(net).axes) == 1  # rates only (no xi measured here)
    with pytest.raises(ValueError, match="shape"):
        cd.VPScore.of(vp.eps_fn, sched, shape=(4, 4))
