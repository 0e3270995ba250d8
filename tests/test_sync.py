"""The synchronization metrics of Section 5 (eq 98-108) against independent computations on hand-made curves."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cosine as scipy_cosine_distance
from scipy.stats import binomtest

from coupled_diffusion.diffusion import sync


def test_cosine_to_final_is_the_batch_mean_of_scipys_cosines():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((5, 3, 4, 4))
    got = sync.cosine_to_final(m)
    want = [np.mean([1 - scipy_cosine_distance(m[i, b].ravel(), m[-1, b].ravel()) for b in range(3)]) for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[-1] == pytest.approx(1.0)
    ref = rng.standard_normal((3, 4, 4))
    want = [np.mean([1 - scipy_cosine_distance(m[i, b].ravel(), ref[b].ravel()) for b in range(3)]) for i in range(5)]
    np.testing.assert_allclose(sync.cosine_to_final(m, ref), want, rtol=1e-12)


def test_cosine_of_a_zero_prediction_is_an_error_naming_it():
    m = np.ones((3, 2, 5))
    m[1, 1] = 0
    with pytest.raises(ValueError, match="sample 1 at row 1 is zero"):
        sync.cosine_to_final(m)


T = np.arange(10)  # timesteps 0..9; the reverse process meets 9 first


@pytest.mark.parametrize(("curve", "tau", "status", "time"), [
    pytest.param([1.0, 0.99, 0.97, 0.93, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1], 0.95, "crossed", 2, id="monotone"),
    pytest.param([1.0, 0.99, 0.97, 0.93, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1], 0.90, "crossed", 4, id="tie-at-threshold"),
    # non-monotone: above at t = 6, dips below at t = 5 and 4: the largest t counts (the first met in reverse)
    pytest.param([1.0, 0.99, 0.98, 0.97, 0.8, 0.85, 0.96, 0.5, 0.3, 0.2], 0.95, "crossed", 6, id="non-monotone"),
    pytest.param([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], 0.95, "never_reached", math.nan, id="never"),
    pytest.param([1.0] * 10, 0.95, "from_start", math.nan, id="above-from-the-start"),
])
def test_crossing_time_is_the_largest_step_at_or_above_tau(curve, tau, status, time):
    got = sync.crossing_time(T, curve, tau)
    # independently: scan from the noise end (t = 9) down, the first step at or above tau
    first = next((t for t in T[::-1] if curve[t] >= tau), None)
    assert got.status == status
    if status == "crossed":
        assert got.time == time == first and got.found
    else:
        assert math.isnan(got.time) and not got.found
    if status == "from_start":
        assert got.bound == 9 and first == 9
    shuffled = np.random.default_rng(1).permutation(10)  # the order of the log does not matter
    assert sync.crossing_time(T[shuffled], np.asarray(curve)[shuffled], tau) == got


def test_sync_gap_is_t_v_minus_t_u_and_missing_when_a_mode_never_crosses():
    cos_u = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.5, 0.3, 0.2]  # u aligns early (large t)
    cos_v = [0.995, 0.99, 0.96, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2]
    gaps = sync.sync_gaps(T, cos_u, cos_v, taus=(0.9, 0.95, 0.999))
    assert gaps[0.9]["gap"] == 3 - 6 and gaps[0.95]["gap"] == 2 - 5  # negative: u first
    assert math.isnan(gaps[0.999]["gap"]) and gaps[0.999]["t_u"].time == 0 and gaps[0.999]["t_v"].status == "never_reached"


def test_ghosting_index():
    np.testing.assert_allclose(sync.ghosting_index([0.9, 1.0], [0.5, 1.0], [0.7, 1.0]), [0.6, 0.0])


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (57, 128), (640, 640), (1, 5000)])
def test_wilson_interval_matches_scipy(k, n):
    lo, hi = sync.wilson(k, n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ci.low, abs=2e-6) and hi == pytest.approx(ci.high, abs=2e-6)
    a = sync.agreement(np.r_[np.zeros(k), np.ones(n - k)], np.zeros(n))
    assert (a["agree"], a["n"], a["phi"]) == (k, n, k / n) and (a["lower"], a["upper"]) == (lo, hi)


def test_excess_agreement_maps_phi_and_its_bounds():
    # independent samples agree half the time: 0.5 -> 0, 1 -> 1, 0.75 -> 0.5
    np.testing.assert_allclose(sync.excess_agreement([0.5, 1.0, 0.75], 0.5), [0.0, 1.0, 0.5])
    lo, hi = sync.wilson(96, 128)
    elo, ehi = sync.excess_agreement([lo, hi], 0.52)
    assert elo == pytest.approx((lo - 0.52) / 0.48) and ehi == pytest.approx((hi - 0.52) / 0.48)
    assert elo < sync.excess_agreement(96 / 128, 0.52) < ehi  # monotone: the interval maps to an interval around it
    with pytest.raises(ValueError, match=r"`phi_indep` must lie in \[0, 1\)"):
        sync.excess_agreement(0.9, 1.0)


def test_speciation_crossing_interpolates_towards_the_next_scan_time():
    t = [10, 40, 70, 100, 130]
    phi_ex = [0.95, 0.80, 0.60, 0.40, 0.05]
    # 0.60 at t = 70, 0.40 at t = 100: 0.55 is reached a quarter of the way, t = 77.5
    assert sync.speciation_crossing(t, phi_ex, 0.55).time == pytest.approx(77.5)
    assert sync.speciation_crossing(t, phi_ex, 0.60).time == pytest.approx(70.0)  # a tie: the scan point itself
    # non-monotone: above again at t = 100, so the crossing lies between 100 and 130
    bumpy = [0.95, 0.50, 0.40, 0.70, 0.10]
    assert sync.speciation_crossing(t, bumpy, 0.55).time == pytest.approx(100 + (0.70 - 0.55) / 0.60 * 30)
    never = sync.speciation_crossing(t, [0.5, 0.4, 0.3, 0.2, 0.1], 0.55)
    assert never.status == "never_reached" and math.isnan(never.time)
    beyond = sync.speciation_crossing(t, [0.9, 0.9, 0.8, 0.7, 0.6], 0.55)
    assert beyond.status == "from_start" and beyond.bound == 130 and beyond.to_json()["time"] is None


@pytest.mark.parametrize(("call", "match"), [
    pytest.param(lambda: sync.crossing_time(T, np.ones(10), 1.2), r"`tau` must lie in \(0, 1\)", id="tau-above-1"),
    pytest.param(lambda: sync.crossing_time(T, np.ones(10), 0.0), r"`tau` must lie in \(0, 1\)", id="tau-0"),
    pytest.param(lambda: sync.sync_gaps(T, np.ones(10), np.ones(10), taus=()), r"`taus` must hold at least one", id="no-taus"),
    pytest.param(lambda: sync.speciation_crossing([], [], 0.55), r"must be 1-D of the same non-zero length", id="empty-scan"),
    pytest.param(lambda: sync.speciation_crossing([1, 2], [0.5, 0.4], 1.0), r"`phi_star` must lie in \(0, 1\)", id="phi-star-1"),
    pytest.param(lambda: sync.speciation_crossing([1, 1], [0.5, 0.4], 0.5), r"`t` must hold distinct finite times", id="repeated-t"),
    pytest.param(lambda: sync.crossing_time(T, np.r_[np.ones(9), np.nan], 0.5), r"`curve` holds non-finite values at t = \[9", id="nan"),
    pytest.param(lambda: sync.agreement([0, 1], [0]), r"need two non-empty label arrays of one size", id="labels"),
])
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()
