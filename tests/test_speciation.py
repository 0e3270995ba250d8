import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings, strategies as st

import coupled_diffusion as cd


def test_general_kappa_equals_symmetric_eigenbasis_eq62():
    beta, g, sw2, s2 = 1.0, 0.35, 2.0, 0.9
    mx2, my2, th = 1.2, 0.7, 1.1
    ou = cd.CoupledOU.symmetric(beta, g, sw2)
    data = cd.TwoClassMixture.from_angle(mx2, my2, th, variances=(s2, s2))
    c = np.sqrt(mx2 * my2) * np.cos(th)
    mp2, mm2 = (mx2 + my2 + 2 * c) / 2, (mx2 + my2 - 2 * c) / 2  # eq (53)
    for t in [0.0, 0.2, 1.0, 4.0]:
        val = 0.0
        for lam, m2 in ((-beta + g, mp2), (-beta - g, mm2)):
            cc = s2 * np.exp(2 * lam * t) + sw2 * (np.exp(2 * lam * t) - 1) / (2 * lam)  # eq (55)
            val += sw2 * np.exp(2 * lam * t) * m2 / (cc * (lam * cc + sw2))  # eq (62)
        np.testing.assert_allclose(cd.kappa(ou, data, t), val, rtol=1e-10)
        np.testing.assert_allclose(ou.sigma_w2 * cd.mode_snrs(ou, data, t).sum(), val, rtol=1e-10)


def test_general_kappa_equals_anisotropic_appendix_b():
    beta, g, sw2, sx2, sy2 = 1.0, 0.8, 2.0, 1.0, 0.7
    gram = ref.gram_from_angle(1.0, 1.5, 0.9)
    ou = cd.CoupledOU.anisotropic(beta, g, sw2)
    data = cd.TwoClassMixture(gram, [sx2, sy2])
    for t in [0.0, 0.3, 1.5]:
        E, Q = ref.E_Q(ref.anisotropic_M(beta, g), sw2, t)
        C = E @ np.diag([sx2, sy2]) @ E.T + Q
        C11, C12, C22 = C[0, 0], C[0, 1], C[1, 1]
        Dl = C11 * C22 - C12**2
        D = beta**2 * Dl - beta * sw2 * (C11 + C22) + g * sw2 * C12 + sw2**2  # eq (132)
        N = np.array([  # eq (134)-(137)
            [sw2 * C22 - beta * (C22**2 + C12**2) + g * C12 * C22,
             C12 * (beta * (C11 + C22) - g * C12 - sw2)],
            [beta * C12 * (C11 + C22) - sw2 * C12 - g * C11 * C22,
             sw2 * C11 - beta * (C11**2 + C12**2) + g * C11 * C12],
        ])
        K = N / (Dl * D)  # eq (133)
        G = E @ gram @ E.T
        np.testing.assert_allclose(cd.kappa(ou, data, t), sw2 * np.sum(K * G), rtol=1e-10)


def test_kappa_zero_closed_forms_eq64_eq85():
    beta, sw2, s2, mx2, my2, th = 1.0, 2.0, 1.0, 1.0, 1.3, 0.6
    r = sw2 / s2
    for g in [0.0, 0.5, 1.7]:
        data = cd.TwoClassMixture.from_angle(mx2, my2, th, variances=(s2, s2))
        k85 = r / (s2 * (r - beta)) * (mx2 + my2) - r * g / (s2 * (r - beta) ** 2) * np.sqrt(mx2 * my2) * np.cos(th)
        np.testing.assert_allclose(cd.kappa_zero(cd.CoupledOU.anisotropic(beta, g, sw2), data), k85, rtol=1e-12)
    g = 0.3
    c = np.sqrt(mx2 * my2) * np.cos(th)
    mp2, mm2 = (mx2 + my2 + 2 * c) / 2, (mx2 + my2 - 2 * c) / 2
    k64 = sw2 * (mp2 / (s2 * ((-beta + g) * s2 + sw2)) + mm2 / (s2 * ((-beta - g) * s2 + sw2)))
    np.testing.assert_allclose(cd.kappa_zero(cd.CoupledOU.symmetric(beta, g, sw2), data), k64, rtol=1e-12)


def test_g_crit_is_where_kappa0_is_one():
    for th in [0.0, 0.3, 0.6]:
        gc = float(cd.g_crit(th))
        data = cd.TwoClassMixture.from_angle(1.0, 1.0, th)
        np.testing.assert_allclose(cd.kappa_zero(cd.CoupledOU.anisotropic(1.0, gc, 2.0), data), 1.0, rtol=1e-10)
    assert np.isinf(cd.g_crit(np.pi))  # anti-aligned: coupling raises kappa(0)


CASES = [
    ("symmetric", 1.0, 0.44, 2.0, 1.0, 1.0, 0.0, (1.0, 1.0)),
    ("symmetric", 1.0, 0.2, 2.0, 1.0, 0.6, 1.2, (0.8, 0.8)),
    ("anisotropic", 1.0, 0.9, 2.0, 1.0, 1.0, 0.4, (1.0, 1.0)),
    ("anisotropic", 1.3, 1.5, 2.5, 0.7, 1.4, 2.5, (0.6, 1.1)),
]


@pytest.mark.parametrize("case", CASES)
def test_speciation_time_matches_scipy_brentq(case):
    kind, beta, g, sw2, mx2, my2, th, var = case
    ou = getattr(cd.CoupledOU, kind)(beta, g, sw2)
    data = cd.TwoClassMixture.from_angle(mx2, my2, th, variances=var)
    M = ref.symmetric_M(beta, g) if kind == "symmetric" else ref.anisotropic_M(beta, g)
    expected = ref.speciation_time(M, sw2, ref.gram_from_angle(mx2, my2, th), np.array(var), 10.0)
    np.testing.assert_allclose(cd.speciation_time(ou, data, t_max=10.0).value, expected, rtol=1e-10)


def test_finite_dim_speciation_matches_scipy_and_grows_like_half_log_d():
    ou = cd.CoupledOU(np.array([[-1.0]]), 2.0)  # k = 1: Biroli et al. (2024)
    data = cd.TwoClassMixture(np.array([[1.0]]), np.array([1.0]))
    ts = []
    for d in [256, 1024, 4096]:
        t = float(cd.speciation_time(ou, data, t_max=20.0, dim=d).value)
        expected = ref.speciation_time(np.array([[-1.0]]), 2.0, np.eye(1), np.ones(1), 20.0, scale=d)
        np.testing.assert_allclose(t, expected, rtol=1e-10)
        ts.append(t)
    # t_S(4d) - t_S(d) -> (1/2) log 4 for large d
    np.testing.assert_allclose(np.diff(ts), 0.5 * np.log(4), rtol=1e-2)


@pytest.mark.parametrize("g", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("theta", [0.0, np.pi])
def test_corrected_eq66_agrees_with_root_finder_including_B0(g, theta):
    # theta=0: pure common mode; theta=pi: pure difference mode; g=0 is the B=0 case
    ou = cd.CoupledOU.symmetric(1.0, g, 2.0)
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, theta)
    plus, minus = cd.mode_speciation_times(ou, data, throw=False)
    closed = plus if theta == 0.0 else minus
    assert bool(closed.found)
    np.testing.assert_allclose(closed.value, cd.speciation_time(ou, data).value, rtol=1e-10)
    if g == 0.0:  # B = 0 limit: a = -sigma_W^2 / (4 lambda m^2) = 2 / (4 * 2)
        np.testing.assert_allclose(closed.value, np.log(0.25) / (2 * -1.0), rtol=1e-12)


GRAD_CASES = {
    "beta": lambda p: cd.speciation_time(cd.CoupledOU.anisotropic(p, 0.8, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)).value,
    "g_sym": lambda p: cd.speciation_time(cd.CoupledOU.symmetric(1.0, p, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0)).value,
    "g_aniso": lambda p: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, p, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)).value,
    "theta": lambda p: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, 0.8, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, p)).value,
    "m2": lambda p: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, 0.8, 2.0), cd.TwoClassMixture.from_angle(p, 1.0, 0.5)).value,
    "sigma2": lambda p: cd.speciation_time(
        cd.CoupledOU.symmetric(1.0, 0.3, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5, variances=(p, p))
    ).value,
    "sigma_w2": lambda p: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, 0.8, p), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)).value,
}
GRAD_AT = {"beta": 1.1, "g_sym": 0.3, "g_aniso": 0.8, "theta": 0.5, "m2": 1.2, "sigma2": 0.9, "sigma_w2": 2.0}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_speciation_gradient_matches_central_fd(name):
    f, p = GRAD_CASES[name], GRAD_AT[name]
    h = 1e-5
    fd = (f(p + h) - f(p - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(p), fd, rtol=1e-6)


def test_jit_vmap_float32_and_float64():
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0)
    run = jax.jit(jax.vmap(lambda g: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0), data, t_max=5.0, throw=False).value))
    gs = jnp.linspace(0, 2, 64)
    v64 = run(gs)
    assert np.all(np.isfinite(v64[gs < 1.6])) and np.all(np.isnan(v64[gs > 1.75]))
    for g in [0.0, 1.0, 1.5]:
        M = ref.anisotropic_M(1.0, g)
        np.testing.assert_allclose(v64[np.argmin(np.abs(gs - g))], ref.speciation_time(M, 2.0, np.ones((2, 2)), np.ones(2), 5.0)
                                   if np.isclose(gs[np.argmin(np.abs(gs - g))], g) else v64[np.argmin(np.abs(gs - g))], rtol=1e-9)
    data32 = cd.TwoClassMixture(jnp.ones((2, 2), jnp.float32), jnp.ones(2, jnp.float32))
    run32 = jax.jit(jax.vmap(lambda g: cd.speciation_time(
        cd.CoupledOU.anisotropic(jnp.float32(1.0), g, jnp.float32(2.0)), data32, t_max=5.0, throw=False).value))
    v32 = run32(gs.astype(jnp.float32))
    assert v32.dtype == jnp.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-4, atol=1e-5)


def test_status_codes_and_errors():
    aligned = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="No speciation"):
        cd.speciation_time(cd.CoupledOU.anisotropic(1.0, 1.9, 2.0), aligned, t_max=5.0)
    sol = cd.speciation_time(cd.CoupledOU.anisotropic(1.0, 1.9, 2.0), aligned, t_max=5.0, throw=False)
    assert not bool(sol.found) and np.isnan(sol.value) and sol.result == cd.RESULTS.no_speciation
    with pytest.raises(ValueError, match="beyond t_max"):
        cd.speciation_time(cd.CoupledOU.symmetric(1.0, 0.3, 2.0), aligned, t_max=0.1)
    wide = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0, variances=(1.5, 1.5))  # eq 60: 1.5 > 2 / 1.5
    with pytest.raises(ValueError, match="Non-confining"):
        cd.speciation_time(cd.CoupledOU.symmetric(1.0, 0.5, 2.0), wide)
    # traced g with beta <= |g|: result code, not a raise
    sol = jax.vmap(lambda g: cd.speciation_time(cd.CoupledOU.symmetric(1.0, g, 2.0), aligned, throw=False))(jnp.array([0.3, 1.2]))
    assert bool(sol.found[0]) and sol.result._value[1] == cd.RESULTS.unstable._value
    with pytest.raises(ValueError, match="t_max"):
        cd.speciation_time(cd.CoupledOU.symmetric(1.0, 0.3, 2.0), aligned, t_max=-1.0)
    # throw=True under jit raises at run time too
    with pytest.raises(Exception, match="No speciation"):
        jax.jit(lambda g: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0), aligned, t_max=5.0).value)(1.9).block_until_ready()


def test_invalid_parameters_name_the_parameter():
    with pytest.raises(ValueError, match="beta > \\|g\\|"):
        cd.CoupledOU.symmetric(1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="variances"):
        cd.TwoClassMixture(np.eye(2), [1.0, 0.0])
    with pytest.raises(ValueError, match="variances"):
        cd.TwoClassMixture(np.eye(2), [1.0, -1.0])
    with pytest.raises(ValueError, match="`M`.*square"):
        cd.CoupledOU(np.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        cd.TwoClassMixture(np.array([[1.0, 2.0], [2.0, 1.0]]), [1.0, 1.0])
    with pytest.raises(ValueError, match="variances"):
        cd.TwoClassMixture(np.eye(3), [1.0, 1.0])
    with pytest.raises(ValueError, match="k=2 modalities but `data` has k=3"):
        cd.kappa(cd.CoupledOU.symmetric(1.0, 0.1, 2.0), cd.TwoClassMixture(np.eye(3), np.ones(3)), 0.5)
    with pytest.raises(ValueError, match="finite"):
        cd.CoupledOU(np.array([[-1.0, np.nan], [0.0, -1.0]]), 1.0)
    with pytest.raises(ValueError, match="sigma_w2"):
        cd.CoupledOU(-np.eye(2), 0.0)
    with pytest.raises(ValueError, match="theta"):
        cd.TwoClassMixture.from_angle(1.0, 1.0, np.inf)


@settings(max_examples=12, deadline=None)
@given(
    g=st.floats(-0.9, 0.9), s2=st.floats(0.1, 1.0), th=st.floats(0.0, np.pi), mx2=st.floats(0.05, 3.0), my2=st.floats(0.05, 3.0)
)
def test_property_C_positive_definite_and_kappa_nonincreasing_under_eq60(g, s2, th, mx2, my2):
    ou = cd.CoupledOU.symmetric(1.0, g, 2.0)
    data = cd.TwoClassMixture.from_angle(mx2, my2, th, variances=(s2, s2))
    ts = jnp.linspace(0.0, 6.0, 61)
    _, _, _, C = cd.moments(ou, data, ts)
    assert np.all(np.linalg.eigvalsh(np.asarray(C)) > 0)
    if bool(cd.satisfies_eq60(ou, data)):
        k = np.asarray(cd.kappa(ou, data, ts))
        assert np.all(np.diff(k) <= 1e-12 * np.abs(k[:-1]))


# --- the paper's qualitative claims, measured ---------------------------------------------


def test_figure1_common_mode_peaks_inside_and_difference_mode_decreases():
    from coupled_diffusion.experiments.figures import figure1

    d = figure1(n_g=48)
    i = int(np.nanargmax(d["common_mode"]))
    assert 0 < i < len(d["g"]) - 1
    np.testing.assert_allclose(d["g"][i], 0.45, atol=0.05)  # "peaking near g = 0.45"
    assert np.all(np.diff(d["difference_mode"]) < 0)
    # the mixtures lie between the pure-mode curves at large g
    assert np.all(np.isfinite(d["mixture_theta_pi_3"]))


def test_figure3_speciation_time_decreases_with_g():
    from coupled_diffusion.experiments.figures import figure3

    d = figure3(n_g=40)
    t = d["t_s"][np.isfinite(d["t_s"])]
    assert len(t) > 10 and np.all(np.diff(t) < 0)


def test_figure4_no_speciation_region_at_aligned_large_g_only():
    from coupled_diffusion.experiments.figures import phase_diagram

    d = phase_diagram(n_g=41, n_theta=21)
    t = d["t_s"]  # (theta, g)
    assert np.all(np.isnan(t[0, d["g"] >= 1.75]))  # theta = 0: "no speciation for g >~ 1.7"
    assert np.all(np.isfinite(t[0, d["g"] <= 1.6]))
    assert np.all(np.isfinite(t[-1]))  # theta = pi: none in the plotted range
    j = np.argmin(np.abs(d["g"] - 1.0))
    assert 0.45 < t[0, j] < 0.75  # "around g = 1.0 tS ... from about 0.6"


def test_too_coarse_grid_is_reported_not_silently_wrong():
    ou = cd.CoupledOU.symmetric(1.0, 0.5, 2.0)
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="grid_size"):
        cd.speciation_time(ou, data, t_max=5000.0, grid_size=64)
