"""Coupling schedules and the theory with a time-dependent M, against SciPy and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from scipy.interpolate import PchipInterpolator

import coupled_diffusion as cd
from coupled_diffusion.schedules import Bounded, Constant, Early, Late, MonotoneSpline, PiecewiseLinear
from tests import reference as ref

KNOTS = [0.0, 0.4, 1.0, 2.5, 4.0]
DATA = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)


def test_monotone_spline_is_scipy_pchip_through_its_knot_values():
    s = MonotoneSpline(KNOTS, jnp.array([0.3, -0.2, 1.0, 0.1, 0.5, 0.2]), lo=-0.5, hi=0.9)
    t = np.linspace(0, 4, 201)
    np.testing.assert_allclose(s(t), PchipInterpolator(KNOTS, np.asarray(s.values))(t), rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=6, max_size=6), st.booleans())
def test_monotone_spline_stays_monotone_and_in_bounds_for_any_parameters(raw, decreasing):
    s = MonotoneSpline(KNOTS, jnp.array(raw), lo=-0.7, hi=0.9, decreasing=decreasing)
    g = np.asarray(s(np.linspace(-1, 5, 400)))
    assert np.all(g >= -0.7) and np.all(g <= 0.9)
    steps = np.diff(g)
    assert np.all(steps <= 1e-12) if decreasing else np.all(steps >= -1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=5, max_size=5))
@example([0.0, 0.0, 0.0, -0.4918950343933055, 20.0])  # saturated tanh: lerp rounded past b
def test_bounded_piecewise_linear_respects_the_bound_for_any_parameters(raw):
    s = PiecewiseLinear(KNOTS, jnp.array(raw), bound=0.95)
    g = np.asarray(s(np.linspace(0, 4, 300)))
    assert np.all(np.abs(g) <= 0.95)


def test_piecewise_linear_and_compositions():
    vals = [0.1, 0.5, -0.3, 0.2, 0.0]
    s = PiecewiseLinear.from_values(KNOTS, vals, bound=0.9)
    t = np.array([0.0, 0.2, 1.7, 3.9, 5.0])
    np.testing.assert_allclose(s(t), np.interp(t, KNOTS, vals), rtol=1e-12)
    c = Late(0.5, 1.0) + 2.0 * Constant(0.1) + Early(-0.3, 2.0)
    np.testing.assert_allclose(c(np.array([0.5, 1.5, 3.0])), [0.7, 0.2, -0.1], rtol=1e-12)
    np.testing.assert_allclose(np.sort(np.asarray(c.jump_ts)), [1.0, 2.0])
    b = Bounded(Constant(5.0), 0.8)
    np.testing.assert_allclose(b(0.3), 0.8 * np.tanh(5.0 / 0.8))
    with pytest.raises(ValueError, match="bound"):
        PiecewiseLinear.from_values(KNOTS, [0.1, 2.0, 0.0, 0.0, 0.0], bound=0.9)
    with pytest.raises(ValueError, match="knots"):
        PiecewiseLinear([0.0, 0.0, 1.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="width"):
        Late(0.5, 1.0, width=0.0)


def test_smooth_step_has_the_right_gradient():
    f = lambda t0: Late(0.7, t0, width=0.2)(1.1)
    h = 1e-6
    np.testing.assert_allclose(jax.grad(f)(1.0), (f(1.0 + h) - f(1.0 - h)) / (2 * h), rtol=1e-7)
    assert Late(0.7, 1.0, width=0.2).jump_ts is None and float(Late(0.7, 1.0).jump_ts) == 1.0


@pytest.mark.parametrize("structure", ["symmetric", "anisotropic"])
def test_constant_schedule_moments_match_closed_form(structure):
    make = getattr(cd.CoupledOU, structure)
    t = jnp.array([0.0, 0.05, 0.7, 3.0, 9.0])
    a = cd.moments(make(1.0, 0.4, 2.0), DATA, t)
    b = cd.moments(make(1.0, Constant(0.4), 2.0), DATA, t)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cd.kappa(make(1.0, Constant(0.4), 2.0), DATA, t), cd.kappa(make(1.0, 0.4, 2.0), DATA, t), rtol=1e-8)


def test_step_schedule_moments_match_the_exact_composition():
    ou = cd.CoupledOU.anisotropic(1.0, Early(0.9, 0.6), 2.0)  # g = 0 before t0, 0.9 after
    E, Q, _, _ = (np.asarray(x) for x in cd.moments(ou, DATA, 2.0))
    E1, Q1 = ref.E_Q(ref.anisotropic_M(1.0, 0.0), 2.0, 0.6)
    E2, Q2 = ref.E_Q(ref.anisotropic_M(1.0, 0.9), 2.0, 1.4)
    np.testing.assert_allclose(E, E2 @ E1, rtol=1e-9)
    np.testing.assert_allclose(Q, Q2 + E2 @ Q1 @ E2.T, rtol=1e-9)


@pytest.mark.parametrize("g", [0.3, 0.8])
def test_speciation_and_collapse_with_a_constant_schedule_match_the_constant_solvers(g):
    const, sched = cd.CoupledOU.anisotropic(1.0, g, 2.0), cd.CoupledOU.anisotropic(1.0, Constant(g), 2.0)
    np.testing.assert_allclose(cd.speciation_time(sched, DATA).value, cd.speciation_time(const, DATA).value, rtol=1e-8)
    np.testing.assert_allclose(cd.speciation_time(sched, DATA, dim=64).value, cd.speciation_time(const, DATA, dim=64).value,
                               rtol=1e-8)
    for cond in (False, True):
        np.testing.assert_allclose(cd.collapse_time(sched, DATA, alpha=0.5, conditional=cond).value,
                                   cd.collapse_time(const, DATA, alpha=0.5, conditional=cond).value, rtol=1e-8)


def test_speciation_time_with_a_step_schedule_matches_brentq():
    # for t past the step (t0 = 0.3 < t_S) the moments are those of the composed constant pieces
    sched = cd.CoupledOU.anisotropic(1.0, Late(1.2, 0.3), 2.0)
    ts = float(cd.speciation_time(sched, DATA).value)
    from scipy.optimize import brentq

    def kappa(t):
        E1, Q1 = ref.E_Q(ref.anisotropic_M(1.0, 1.2), 2.0, 0.3)
        E2, Q2 = ref.E_Q(ref.anisotropic_M(1.0, 0.0), 2.0, t - 0.3)
        E, Q = E2 @ E1, Q2 + E2 @ Q1 @ E2.T
        C = E @ E.T + Q
        G = E @ np.asarray(DATA.gram) @ E.T
        M = ref.anisotropic_M(1.0, 0.0)
        return 2.0 * np.trace(np.linalg.solve(C @ M @ C + 2.0 * C, G)) - 1.0

    np.testing.assert_allclose(ts, brentq(kappa, 0.31, 5.0, xtol=1e-13), rtol=1e-8)


def test_gradient_of_speciation_time_through_a_schedule_matches_fd():
    def f(p):
        raw = jnp.array([0.2, p, -0.4, 0.1, 0.3])
        ou = cd.CoupledOU.symmetric(1.0, PiecewiseLinear(KNOTS, raw, bound=0.9), 2.0)
        return cd.speciation_time(ou, DATA).value

    h = 1e-5
    np.testing.assert_allclose(jax.grad(f)(0.5), (f(0.5 + h) - f(0.5 - h)) / (2 * h), rtol=1e-5)


SUP_CASES = {
    "constant": Constant(-0.7),
    "late": Late(0.6, 0.4),
    "late-smooth": Late(0.6, 0.4, width=0.2),
    "early-smooth": Early(-0.8, 0.4, width=0.05),
    "piecewise": PiecewiseLinear([0.0, 0.5, 2.0], [0.2, -0.9, 0.4]),
    "piecewise-bounded": PiecewiseLinear([0.0, 0.5, 2.0], [3.0, -1.0, 0.0], bound=0.8),
    "spline": MonotoneSpline([0.0, 0.5, 1.0, 3.0], [0.1, -0.2, 0.3, 0.0, 0.5], lo=-0.3, hi=0.95, decreasing=True),
    "scaled": -2.0 * PiecewiseLinear([0.0, 1.0], [0.1, 0.3]),
    "bounded": Bounded(Late(3.0, 1.0), 0.9),
}


@pytest.mark.parametrize("name", sorted(SUP_CASES))
def test_sup_abs_is_the_largest_value_on_a_dense_time_grid(name):
    schedule = SUP_CASES[name]
    t = np.concatenate([np.linspace(0.0, 5.0, 200_001), [50.0, 1e3]])  # past the last knot and the logistic tails
    on_grid = float(np.max(np.abs(np.asarray(jax.vmap(schedule)(jnp.asarray(t))))))
    assert abs(float(schedule.sup_abs()) - on_grid) < 1e-5


def test_a_symmetric_schedule_reaching_beta_is_refused_or_reported_unstable():
    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"sup \|g\(t\)\| = 1.2 >= beta = 1"):
        cd.CoupledOU.symmetric(1.0, PiecewiseLinear([0.0, 1.0], [0.0, 1.2]), 2.0)
    # under jit the schedule's values are traced: the solvers' result code says it instead
    solve = jax.jit(lambda v: cd.speciation_time(cd.CoupledOU.symmetric(1.0, PiecewiseLinear([0.0, 1.0], jnp.stack([0.0, v])), 2.0),
                                                 data, throw=False).result)
    assert solve(1.2) == cd.RESULTS.unstable and solve(0.5) == cd.RESULTS.successful
    # a sum's supremum is not known exactly (the two steps never overlap: sup |g| = 0.5, not 1), so it is not refused
    summed = cd.CoupledOU.symmetric(0.8, Late(0.5, 0.3) + Early(0.5, 0.6), 2.0)
    assert bool(summed.stable()) and summed.M.sup_abs_g() is None
    assert bool(cd.CoupledOU.anisotropic(1.0, Constant(5.0), 2.0).stable())  # one-way coupling: beta > 0 suffices


def test_mode_speciation_times_under_a_schedule_reaching_beta_report_unstable():
    from coupled_diffusion.optimize import schedule_mode_speciation_times

    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"sup \|g\(t\)\| = 1.1 >= beta = 1"):
        schedule_mode_speciation_times(1.0, Constant(1.1), 2.0, data)
    solve = jax.jit(lambda g: [s.result for s in schedule_mode_speciation_times(1.0, Constant(g), 2.0, data)])
    assert all(r == cd.RESULTS.unstable for r in solve(1.1))
    plus, minus = solve(0.3)
    assert plus == cd.RESULTS.successful and minus == cd.RESULTS.no_speciation  # the difference mode never speciates here
