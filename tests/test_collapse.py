import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import coupled_diffusion as cd


@pytest.mark.parametrize("kind,g", [("symmetric", 0.0), ("symmetric", 0.6), ("anisotropic", 1.2)])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 4.0])
def test_joint_and_conditional_collapse_match_brentq(kind, g, alpha):
    ou = getattr(cd.CoupledOU, kind)(1.0, g, 1.5)
    var = np.array([0.8, 1.2])
    data = cd.TwoClassMixture(np.eye(2), var)
    M = ref.symmetric_M(1.0, g) if kind == "symmetric" else ref.anisotropic_M(1.0, g)
    for conditional in (False, True):
        expected = ref.collapse_time(M, 1.5, var, alpha, conditional, lo=1e-7)
        got = cd.collapse_time(ou, data, alpha=alpha, conditional=conditional).value
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_mode_collapse_eq78_solves_eq77_and_zero_coupling_saturates_bound():
    alpha, s2, sw2 = 1.0, 1.0, 1.0
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0, variances=(s2, s2))
    for g in [0.0, 0.4, 0.8]:
        ou = cd.CoupledOU.symmetric(1.0, g, sw2)
        tp, tm = cd.mode_collapse_times(ou, data, alpha=alpha)
        for tc, tau in ((tp.value, 2 * (1.0 - g)), (tm.value, 2 * (1.0 + g))):
            # eq (77) with n^{1/d} -> e^{2 alpha}
            np.testing.assert_allclose(1 + s2 / sw2 * tau / np.expm1(tau * tc), np.exp(2 * alpha), rtol=1e-12)
        bound = cd.collapse_time_bound(ou, data, alpha=alpha)
        joint = cd.collapse_time(ou, data, alpha=alpha).value
        assert joint <= bound * (1 + 1e-12)
    # k=2, g -> 0: eq (75) bound is approached (e^x - 1 ~ x fails only at O(t)), and all three agree
    ou0 = cd.CoupledOU.symmetric(1.0, 0.0, sw2)
    tp, tm = cd.mode_collapse_times(ou0, data, alpha=alpha)
    np.testing.assert_allclose(tp.value, cd.collapse_time(ou0, data, alpha=alpha).value, rtol=1e-10)


def test_rem_cgf_eq68_and_rate_function_at_collapse():
    beta, g, sw2, s2 = 1.0, 0.4, 2.0, 0.7
    ou = cd.CoupledOU.symmetric(beta, g, sw2)
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.3, variances=(s2, s2))
    t, b = 0.6, 0.8
    chi = [s2 / sw2 * 2 * lam / (1 - np.exp(-2 * lam * t)) for lam in (-beta + g, -beta - g)]  # eq (67)
    lam68 = sum(-0.25 * np.log(1 + b * c) - 0.25 * b * (1 + c) / (1 + b * c) for c in chi)  # eq (68)
    np.testing.assert_allclose(cd.rem_cgf(ou, data, t, b), lam68, rtol=1e-12)
    # eq (69)-(70): at the collapse time, -Lambda'(1) = 1/2 and alpha = I(1/2) = -Lambda(1) - 1/2
    alpha = 0.7
    tc = cd.collapse_time(ou, data, alpha=alpha).value
    dl = jax.grad(lambda bb: cd.rem_cgf(ou, data, tc, bb))(1.0)
    np.testing.assert_allclose(-dl, 0.5, rtol=1e-12)
    np.testing.assert_allclose(cd.rem_rate(ou, data, tc, 0.5), alpha, rtol=1e-9)
    np.testing.assert_allclose(-cd.rem_cgf(ou, data, tc, 1.0) - 0.5, alpha, rtol=1e-10)


@pytest.mark.parametrize("which", ["alpha", "g", "beta", "sigma2"])
def test_collapse_gradients_match_fd(which):
    def f(p):
        kw = dict(alpha=0.8, g=0.9, beta=1.0, sigma2=1.1)
        kw[which] = p
        ou = cd.CoupledOU.anisotropic(kw["beta"], kw["g"], 1.0)
        data = cd.TwoClassMixture(np.eye(2), jnp.stack([kw["sigma2"], kw["sigma2"]]))
        return cd.collapse_time(ou, data, alpha=kw["alpha"], conditional=True).value + cd.collapse_time(ou, data, alpha=kw["alpha"]).value

    p = dict(alpha=0.8, g=0.9, beta=1.0, sigma2=1.1)[which]
    fd = (f(p + 1e-5) - f(p - 1e-5)) / 2e-5
    np.testing.assert_allclose(jax.grad(f)(p), fd, rtol=1e-6)


def test_collapse_status():
    ou = cd.CoupledOU.symmetric(1.0, 0.3, 2.0)
    data = cd.TwoClassMixture(np.eye(2), np.ones(2))
    with pytest.raises(ValueError, match="No collapse"):
        cd.collapse_time(ou, data, alpha=0.0)
    sol = cd.collapse_time(ou, data, alpha=-1.0, throw=False)
    assert not bool(sol.found) and np.isnan(sol.value)
    with pytest.raises(ValueError, match="not crossed"):
        cd.collapse_time(ou, data, alpha=30.0, t_min=1e-6)
    with pytest.raises(ValueError, match="No collapse"):
        cd.mode_collapse_times(ou, data, alpha=0.0)


def test_figure2_joint_flat_modes_split():
    from coupled_diffusion.experiments.figures import figure2

    d = figure2(n_g=30)
    joint = d["joint"]
    assert np.ptp(joint) / joint.mean() < 0.01  # "t_C remains nearly constant"
    assert np.all(np.diff(d["common_mode"]) > 0) and np.all(np.diff(d["difference_mode"]) < 0)


def test_figure5_conditional_below_joint():
    from coupled_diffusion.experiments.figures import figure5

    d = figure5(n_g=30)
    assert np.all(d["conditional"][1:] < d["joint"][1:])
    # for one (n, d): alpha_joint = log n / (2d), alpha_cond = log n / d -> clearly earlier
    ou = cd.CoupledOU.anisotropic(1.0, 1.0, 1.0)
    data = cd.TwoClassMixture(np.eye(2), np.ones(2))
    n, dim = 10_000, 16
    tj = cd.collapse_time(ou, data, alpha=cd.alpha_from_n(n, 2 * dim)).value
    tcnd = cd.collapse_time(ou, data, alpha=cd.alpha_from_n(n, dim), conditional=True).value
    assert tcnd < 0.7 * tj
