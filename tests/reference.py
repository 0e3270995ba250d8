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
