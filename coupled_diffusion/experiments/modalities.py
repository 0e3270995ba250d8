r"""The spectral hierarchy of k coupled modalities: when each eigenmode commits, swept over k, graph and g.

Section 6 of the multimodal paper conjectures that with more modalities the spectrum of M orders the
commitment of many eigenmodes, not two. For each coupling graph (`cd.GRAPHS`) and k = 2 ... `k_max`, the
couplings $g$ span the graph's stability interval (fractions of its ends), and [`mode_hierarchy`][] gives
every mode's speciation and collapse time, the order of commitment, the gaps between successive modes and
the spread (first minus last commitment), `vmap`ped over $g$ in one compiled call per (graph, k).

The data are equicorrelated modalities: class means of equal norm $m^2$ with pairwise cosine $\rho$,
$G_0 = m^2[(1 - \rho) I + \rho J]$, equal variances $\sigma^2$, the $k$-modality generalisation of eq (82)
with $\theta = \arccos\rho$: the uniform direction carries $m^2(1 + (k - 1)\rho)$ and every direction
orthogonal to it $m^2(1 - \rho)$.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..theory.graphs import GRAPHS, adjacency, stability_interval
from ..theory.mixture import TwoClassMixture
from ..theory.modes import mode_hierarchy
from ..theory.ou import CoupledOU


@dataclasses.dataclass(frozen=True)
class ModalitiesSweep:
    """The sweep's settings (defaults: the paper's beta = 1, sigma_W^2 = 2, sigma^2 = 1).

    - `graphs`, `k_min` ... `k_max`: the coupling graphs and numbers of modalities (a ring from k = 3).
    - `n_g`: couplings per (graph, k) as fractions of the stability interval's ends, uniform on [-`fraction`,
      `fraction`] (see `fractions`; the default 39 puts 0, +-0.5 and +-0.95 on the grid).
    - `m2`, `rho`, `sigma2`: the equicorrelated data (see the module docstring); `dim`: None for the paper's
      per-dimension criterion (eq 62), or d for the finite-d one; `alpha`: the per-mode collapse's log(n)/d.
    """

    graphs: tuple[str, ...] = GRAPHS
    k_min: int = 2
    k_max: int = 16
    n_g: int = 39
    fraction: float = 0.95
    beta: float = 1.0
    sigma_w2: float = 2.0
    sigma2: float = 1.0
    m2: float = 2.0
    rho: float = 0.5
    dim: int | None = None
    alpha: float = 0.5

    def validate(self) -> None:
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad or not self.graphs:
            raise ValueError(f"`graphs` must be a non-empty subset of {GRAPHS}, got {self.graphs!r}.")
        if not (isinstance(self.k_min, int) and isinstance(self.k_max, int) and 2 <= self.k_min <= self.k_max):
            raise ValueError(f"`k_min` and `k_max` must be integers with 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}.")
        if not (isinstance(self.n_g, int) and self.n_g >= 2):
            raise ValueError(f"`n_g` must be an integer >= 2, got {self.n_g!r}.")
        if not 0 < self.fraction < 1:
            raise ValueError(f"`fraction` of the stability interval must lie in (0, 1), got {self.fraction}.")
        for name in ("beta", "sigma_w2", "sigma2", "m2", "alpha"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {v!r}.")
        if not -1.0 / (self.k_max - 1) <= self.rho <= 1.0:
            raise ValueError(f"`rho` must lie in [-1/(k_max - 1), 1] = [{-1.0 / (self.k_max - 1):.4g}, 1] for the Gram matrix to be "
                             f"positive semi-definite at every k, got {self.rho}.")
        if self.dim is not None and not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"`dim` must be None or a positive integer, got {self.dim!r}.")

    def fractions(self) -> np.ndarray:
        """The couplings as signed fractions of the stability interval's ends: `n_g` points uniform on
        [-`fraction`, `fraction`] (g = f g_hi for f >= 0, |f| g_lo for f < 0); an odd `n_g` includes g = 0."""
        return np.linspace(-self.fraction, self.fraction, self.n_g)

    def gram(self, k: int) -> np.ndarray:
        return self.m2 * ((1 - self.rho) * np.eye(k) + self.rho * np.ones((k, k)))


def _one_k(cfg: ModalitiesSweep, graphs: list[str], k: int) -> dict:
    """All `graphs` at one k in one compiled call: the adjacency matrices travel as data, vmapped with the couplings."""
    intervals = [tuple(float(v) for v in stability_interval(graph, k, cfg.beta)) for graph in graphs]
    f = cfg.fractions()
    gs = np.stack([np.where(f < 0, -f * lo, f * hi) for lo, hi in intervals])
    As = np.stack([adjacency(graph, k) for graph in graphs])
    data = TwoClassMixture(cfg.gram(k), np.full(k, cfg.sigma2))
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64

    def one(A, g):
        M = -cfg.beta * jnp.eye(k, dtype=dtype) + g * A  # = coupling_matrix(graph, k, beta, g), traced
        h = mode_hierarchy(CoupledOU(M, cfg.sigma_w2), data, dim=cfg.dim, alpha=cfg.alpha)
        return {"eigenvalues": h.eigenvalues, "m2": h.m2, "t_speciation": h.speciation.value, "t_collapse": h.collapse.value,
                "order": h.order, "n_committed": h.n_committed, "spread": h.spread, "gaps": h.gaps, "spectral_gap": h.spectral_gap,
                "spectral_width": h.spectral_width, "speciation_result": h.speciation.result._value}

    batched = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0))))(jnp.asarray(As, dtype), jnp.asarray(gs, dtype))
    out = {}
    for i, graph in enumerate(graphs):
        out[graph] = {name: np.asarray(v[i]) for name, v in batched.items()}
        out[graph]["g"] = gs[i]
        out[graph]["fraction"] = f
        out[graph]["g_interval"] = list(intervals[i])
    return out


def modalities_sweep(cfg: ModalitiesSweep | None = None, *, progress=None) -> dict:
    r"""Run the sweep. **Returns:** `{"params": ..., "results": {graph: {k: {...}}}, "scaling": {...}}` where each
    (graph, k) entry holds, over the `n_g` couplings `g`: `eigenvalues`, `m2`, `t_speciation`, `t_collapse`
    `(n_g, k)` in decreasing-eigenvalue order (NaN where a mode has none), the commitment `order`,
    `n_committed`, `spread`, `gaps`, `spectral_gap`, `spectral_width`. `scaling[graph]` fits $\log(\mathrm{spread})$ against
    $\log k$ at the coupling fractions 0.5 and `fraction` of the positive end (the slope is the power law's
    exponent, with the $k$ used). `progress(i, n)` is called after each k (all graphs at one k are one compiled,
    doubly vmapped call)."""
    cfg = ModalitiesSweep() if cfg is None else cfg
    cfg.validate()
    ks = list(range(cfg.k_min, cfg.k_max + 1))
    results: dict = {graph: {} for graph in cfg.graphs}
    for i, k in enumerate(ks):
        for graph, r in _one_k(cfg, [g for g in cfg.graphs if not (g == "ring" and k < 3)], k).items():
            results[graph][k] = r
        if progress is not None:
            progress(i + 1, len(ks))
    scaling = {}
    for graph in cfg.graphs:
        scaling[graph] = {}
        for frac in (0.5, cfg.fraction):
            ks, spreads = [], []
            for k, r in results[graph].items():
                j = int(np.argmin(np.abs(r["fraction"] - frac)))
                if np.isfinite(r["spread"][j]) and r["spread"][j] > 0:
                    ks.append(k)
                    spreads.append(float(r["spread"][j]))
            fit = np.polyfit(np.log(ks), np.log(spreads), 1) if len(ks) >= 3 else [np.nan, np.nan]
            scaling[graph][f"{frac:.3g}"] = {"k": ks, "spread": spreads, "exponent": float(fit[0])}
    return {"params": dataclasses.asdict(cfg), "results": results, "scaling": scaling}
