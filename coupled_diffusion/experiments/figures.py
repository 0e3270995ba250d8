"""Figures 1-5 of "Dynamical regimes of multimodal diffusion models": the theory curves.

Each `figureN` returns a dict of NumPy arrays and metadata; `plotting` draws them and the
CLI writes PNG + JSON. Parameters are the paper's (stated in each figure caption).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ..theory.collapse import collapse_time
from ..theory.mixture import TwoClassMixture
from ..theory.modes import mode_collapse_times, mode_speciation_times
from ..theory.ou import CoupledOU
from ..theory.speciation import g_crit, speciation_time


def _np(x):
    return np.asarray(jax.device_get(x), dtype=float)


def figure1(n_g: int = 96) -> dict:
    """Speciation time vs g, symmetric M (beta=1, sigma_W^2=2, sigma^2=1, m_x^2=m_y^2=1).

    Pure common mode (theta=0, m_+^2=2) and pure difference mode (theta=pi, m_-^2=2) by
    the corrected eq (66); mixtures theta=pi/3, 2pi/3 by root-finding. g stays below 1,
    where eq (60) (confinement) fails for sigma^2 = 1.
    """
    g = jnp.linspace(0.0, 0.95, n_g)

    def modes(theta, which):
        data = TwoClassMixture.from_angle(1.0, 1.0, theta)
        return jax.vmap(lambda gg: mode_speciation_times(CoupledOU.symmetric(1.0, gg, 2.0), data, throw=False)[which].value)(g)

    def numeric(theta):
        data = TwoClassMixture.from_angle(1.0, 1.0, theta)
        return jax.vmap(lambda gg: speciation_time(CoupledOU.symmetric(1.0, gg, 2.0), data, t_max=10.0, throw=False).value)(g)

    out = {"g": _np(g)}
    out["common_mode"] = _np(jax.jit(lambda: modes(0.0, 0))())
    out["difference_mode"] = _np(jax.jit(lambda: modes(np.pi, 1))())
    out["mixture_theta_pi_3"] = _np(jax.jit(lambda: numeric(np.pi / 3))())
    out["mixture_theta_2pi_3"] = _np(jax.jit(lambda: numeric(2 * np.pi / 3))())
    out["params"] = dict(beta=1.0, sigma_w2=2.0, variance=1.0, m_x2=1.0, m_y2=1.0)
    return out


def figure2(n_g: int = 96, alpha: float = 1.0) -> dict:
    """Collapse times vs g, symmetric M (beta=1, sigma^2/sigma_W^2=1, alpha=1): joint and per mode."""
    g = jnp.linspace(0.0, 0.95, n_g)
    data = TwoClassMixture.from_angle(1.0, 1.0, 0.0, variances=(1.0, 1.0))

    @jax.jit
    def run():
        def one(gg):
            ou = CoupledOU.symmetric(1.0, gg, 1.0)
            tp, tm = mode_collapse_times(ou, data, alpha=alpha, throw=False)
            return collapse_time(ou, data, alpha=alpha, throw=False).value, tp.value, tm.value

        return jax.vmap(one)(g)

    joint, plus, minus = run()
    return {"g": _np(g), "joint": _np(joint), "common_mode": _np(plus), "difference_mode": _np(minus),
            "params": dict(beta=1.0, sigma_w2=1.0, variance=1.0, alpha=alpha)}


def figure3(n_g: int = 96) -> dict:
    """Speciation time vs g, anisotropic M, uninformative context (mu_x=0, m_y^2=2)."""
    g = jnp.linspace(0.0, 2.0, n_g)
    data = TwoClassMixture(jnp.array([[0.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
    run = jax.jit(jax.vmap(lambda gg: speciation_time(CoupledOU.anisotropic(1.0, gg, 2.0), data, t_max=10.0, throw=False).value))
    return {"g": _np(g), "t_s": _np(run(g)), "params": dict(beta=1.0, sigma_w2=2.0, variance=1.0, m_x2=0.0, m_y2=2.0)}


@jax.jit
def phase_grid(g, theta, t_max):
    """t_S on the product grid theta x g (anisotropic M, m_x^2 = m_y^2 = 1); NaN = no speciation."""

    def one(gg, th):
        data = TwoClassMixture.from_angle(1.0, 1.0, th)
        return speciation_time(CoupledOU.anisotropic(1.0, gg, 2.0), data, t_max=t_max, throw=False).value

    return jax.vmap(lambda th: jax.vmap(lambda gg: one(gg, th))(g))(theta)


def phase_diagram(n_g: int = 128, n_theta: int = 128, *, g_max: float = 2.0, t_max: float = 10.0) -> dict:
    """t_S(g, theta), anisotropic M, m_x^2=m_y^2=1 (Figure 4), with g_crit(theta) (eq 85)."""
    g = jnp.linspace(0.0, g_max, n_g)
    theta = jnp.linspace(0.0, np.pi, n_theta)
    t_max = jnp.asarray(t_max, g.dtype)

    return {"g": _np(g), "theta": _np(theta), "t_s": _np(phase_grid(g, theta, t_max)), "g_crit": _np(g_crit(theta)),
            "params": dict(beta=1.0, sigma_w2=2.0, variance=1.0, m_x2=1.0, m_y2=1.0, t_max=float(t_max))}


def figure5(n_g: int = 96, alpha: float = 1.0) -> dict:
    """Joint and conditional (y|x) collapse times vs g, anisotropic M (beta=1, sigma_W^2=1, sigma^2=1, alpha=1)."""
    g = jnp.linspace(0.0, 2.0, n_g)
    data = TwoClassMixture.from_angle(1.0, 1.0, 0.0)

    @jax.jit
    def run(g):
        def one(gg):
            ou = CoupledOU.anisotropic(1.0, gg, 1.0)
            return (collapse_time(ou, data, alpha=alpha, throw=False).value,
                    collapse_time(ou, data, alpha=alpha, conditional=True, throw=False).value)

        return jax.vmap(one)(g)

    joint, cond = run(g)
    return {"g": _np(g), "joint": _np(joint), "conditional": _np(cond),
            "params": dict(beta=1.0, sigma_w2=1.0, variance=1.0, alpha=alpha)}


FIGURES = {"figure1": figure1, "figure2": figure2, "figure3": figure3, "figure4": phase_diagram, "figure5": figure5}
