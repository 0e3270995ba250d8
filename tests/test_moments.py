import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import coupled_diffusion as cd


def _random_stable(k, rng):
    A = rng.normal(size=(k, k))
    # shift so that every eigenvalue has real part <= -0.2
    shift = np.max(np.linalg.eigvals(A).real) + 0.2 + rng.uniform(0, 1)
    return A - shift * np.eye(k)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["series", "van_loan"])
def test_transition_matches_scipy(k, method):
    rng = np.random.default_rng(k)
    transition = jax.jit(lambda M, sw2, t: cd.transition(M, sw2, t, method=method))  # one compile, not op by op per call
    for _ in range(3):
        M = _random_stable(k, rng)
        sw2 = rng.uniform(0.5, 3.0)
        for t in [1e-6, 0.05, 0.7, 3.0, 12.0]:
            E, Q = transition(jnp.asarray(M), jnp.float64(sw2), jnp.float64(t))
            Er, Qr = ref.E_Q(M, sw2, t)
            np.testing.assert_allclose(E, Er, rtol=1e-8, atol=1e-12 * np.abs(Er).max())
            np.testing.assert_allclose(Q, Qr, rtol=1e-8, atol=1e-10 * np.abs(Qr).max())


def test_moments_vectorised_and_consistent():
    rng = np.random.default_rng(0)
    M = _random_stable(3, rng)
    var = np.array([0.5, 1.0, 2.0])
    ou = cd.CoupledOU(M, 1.3)
    data = cd.TwoClassMixture(np.eye(3), var)
    ts = np.array([0.0, 0.3, 2.0])
    E, Q, S, C = cd.moments(ou, data, ts)
    assert E.shape == (3, 3, 3)
    for i, t in enumerate(ts):
        Er, Qr = ref.E_Q(M, 1.3, t)
        Sr = Er @ np.diag(var) @ Er.T
        np.testing.assert_allclose(S[i], Sr, rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(C[i], Sr + Qr, rtol=1e-8, atol=1e-14)


def test_anisotropic_appendix_b_closed_forms():
    # eq (121)-(129), written out independently
    beta, g, sw2, sx2, sy2 = 1.0, 0.7, 2.0, 0.8, 1.3
    ou = cd.CoupledOU.anisotropic(beta, g, sw2)
    data = cd.TwoClassMixture(np.eye(2), [sx2, sy2])
    for t in [0.01, 0.5, 2.0, 6.0]:
        u = 1 - np.exp(-2 * beta * t)
        kk = 1 - np.exp(-2 * beta * t) * (1 + 2 * beta * t)
        h = 1 - np.exp(-2 * beta * t) * (1 + 2 * beta * t + 2 * beta**2 * t**2)
        q11, q12 = sw2 * u / (2 * beta), sw2 * g * kk / (4 * beta**2)
        q22 = sw2 * (u / (2 * beta) + g**2 * h / (4 * beta**3))
        e = np.exp(-2 * beta * t)
        C11, C12 = e * sx2 + q11, e * g * t * sx2 + q12
        C22 = e * sy2 + e * g**2 * t**2 * sx2 + q22
        E, Q, S, C = cd.moments(ou, data, t)
        np.testing.assert_allclose(E, np.exp(-beta * t) * np.array([[1, 0], [g * t, 1]]), rtol=1e-12)
        np.testing.assert_allclose(Q, [[q11, q12], [q12, q22]], rtol=1e-10)
        np.testing.assert_allclose(C, [[C11, C12], [C12, C22]], rtol=1e-10)


def test_float32_runs_and_is_close():
    ou = cd.CoupledOU(jnp.asarray(ref.symmetric_M(1.0, 0.4), jnp.float32), jnp.float32(2.0))
    data = cd.TwoClassMixture(jnp.eye(2, dtype=jnp.float32), jnp.ones(2, jnp.float32))
    E, Q, S, C = cd.moments(ou, data, jnp.float32(1.5))
    assert C.dtype == jnp.float32
    Er, Qr = ref.E_Q(ref.symmetric_M(1.0, 0.4), 2.0, 1.5)
    np.testing.assert_allclose(Q, Qr, rtol=2e-6)


def test_grad_of_moments_matches_fd():
    f = lambda g, t: cd.transition(jnp.array([[-1.0, g], [g, -1.0]]), 2.0, t)[1][0, 1]
    for g, t in [(0.3, 0.4), (0.5, 7.0)]:
        fd = (f(g + 1e-6, t) - f(g - 1e-6, t)) / 2e-6
        np.testing.assert_allclose(jax.grad(f)(g, t), fd, rtol=1e-6)
        fd_t = (f(g, t + 1e-6) - f(g, t - 1e-6)) / 2e-6
        np.testing.assert_allclose(jax.grad(f, argnums=1)(g, t), fd_t, rtol=1e-6)
