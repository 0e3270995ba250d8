"""Independent SciPy/NumPy computations of the paper's equations (no project code)."""

import numpy as np
import scipy.integrate as si
import scipy.linalg as sl
import scipy.optimize as so


def E_Q(M, sw2, t):
    M = np.asarray(M, float)
    E = sl.expm(M * t)
    if t == 0:
        return E, np.zeros_like(M)
    Q, _ = si.quad_vec(lambda s: sw2 * sl.expm(M * s) @ sl.expm(M * s).T, 0.0, t, epsabs=0, epsrel=1e-13)
    return E, Q


def kappa(M, sw2, gram, var, t, E_Q_fn=E_Q):
    E, Q = E_Q_fn(M, sw2, t)
    C = E @ np.diag(var) @ E.T + Q
    G = E @ gram @ E.T
    Ci = np.linalg.inv(C)
    K = Ci @ np.linalg.inv(M + sw2 * Ci) @ Ci  # eq (79) corrected, eq (133)
    return sw2 * np.sum(K * G)


def speciation_time(M, sw2, gram, var, t_max, scale=1.0, n_grid=200):
    f = lambda t: scale * kappa(M, sw2, gram, var, t) - 1.0
    ts = np.linspace(0, t_max, n_grid + 1)
    F = np.array([f(t) for t in ts])
    pos = np.nonzero(F >= 0)[0]
    if len(pos) == 0 or pos[-1] == n_grid:
        return np.nan
    j = pos[-1]
    return so.brentq(f, ts[j], ts[j + 1], xtol=1e-14, rtol=1e-14)


def collapse_lhs(M, sw2, var, t, conditional=False):
    E, Q = E_Q(M, sw2, t)
    C = E @ np.diag(var) @ E.T + Q
    if conditional:  # eq (88)-(89)
        cy = C[1, 1] - C[0, 1] ** 2 / C[0, 0]
        qy = Q[1, 1] - Q[0, 1] ** 2 / Q[0, 0]
        return 0.5 * np.log(cy / qy)
    k = M.shape[0]
    return (np.linalg.slogdet(C)[1] - np.linalg.slogdet(Q)[1]) / (2 * k)


def collapse_time(M, sw2, var, alpha, conditional=False, lo=1e-6, hi=50.0):
    f = lambda t: collapse_lhs(M, sw2, var, t, conditional) - alpha
    return so.brentq(f, lo, hi, xtol=1e-15, rtol=1e-14)


def symmetric_M(beta, g):
    return np.array([[-beta, g], [g, -beta]])


def anisotropic_M(beta, g):
    return np.array([[-beta, 0.0], [g, -beta]])


def gram_from_angle(mx2, my2, theta):
    c = np.sqrt(mx2 * my2) * np.cos(theta)
    return np.array([[mx2, c], [c, my2]])


def E_Q_lyapunov(M, sw2, t):
    """E = e^{Mt} (SciPy expm) and Q(t) = Q_inf - E Q_inf E^T, Q_inf the stationary covariance solving the Lyapunov
    equation M Q + Q M^T + sw2 I = 0 (SciPy; a stable M only): stable at any t, unlike a block exponential."""
    M = np.asarray(M, float)
    E = sl.expm(M * t)
    Qinf = sl.solve_continuous_lyapunov(M, -sw2 * np.eye(M.shape[0]))
    return E, Qinf - E @ Qinf @ E.T


def mode_kappas(M, sw2, gram, sigma2, t, V):
    """Per-mode kappa_i = sw2 [V^T K V]_ii [V^T G(t) V]_ii from the full k x k matrices (K of eq 133), in the
    orthonormal eigenbasis V of a symmetric M (where K and C are diagonal); their sum is kappa."""
    E, Q = E_Q_lyapunov(M, sw2, t)
    C = sigma2 * E @ E.T + Q
    Ci = np.linalg.inv(C)
    K = Ci @ np.linalg.inv(M + sw2 * Ci) @ Ci
    return sw2 * np.diag(V.T @ K @ V) * np.diag(V.T @ E @ gram @ E.T @ V)


def mode_speciation_times(M, sw2, gram, sigma2, V, t_max=15.0, scale=1.0, n_grid=150):
    """Each mode's last crossing of scale * kappa_i(t) = 1 on [0, t_max] by brentq (NaN where none); the grid
    evaluates every mode's kappa at once."""
    ts = np.linspace(1e-9, t_max, n_grid + 1)
    F = np.array([scale * mode_kappas(M, sw2, gram, sigma2, t, V) - 1.0 for t in ts])  # (grid, k)
    out = []
    for i in range(V.shape[1]):
        pos = np.nonzero(F[:, i] >= 0)[0]
        if len(pos) == 0 or pos[-1] == n_grid:
            out.append(np.nan)
            continue
        f = lambda t, i=i: scale * mode_kappas(M, sw2, gram, sigma2, t, V)[i] - 1.0  # noqa: E731
        out.append(so.brentq(f, ts[pos[-1]], ts[pos[-1] + 1], xtol=1e-14, rtol=1e-13))
    return np.array(out)


def mode_collapse_times(M, sw2, sigma2, V, alpha, lo=1e-8, hi=60.0):
    """Each mode's collapse time: [V^T C V]_ii / [V^T Q V]_ii = e^{2 alpha} (the per-mode REM) by brentq."""
    def f(t, i):
        E, Q = E_Q_lyapunov(M, sw2, t)
        C = sigma2 * E @ E.T + Q
        return np.log((V[:, i] @ C @ V[:, i]) / (V[:, i] @ Q @ V[:, i])) - 2 * alpha

    return np.array([so.brentq(f, lo, hi, args=(i,), xtol=1e-15, rtol=1e-13) for i in range(V.shape[1])])
