r"""Coupling graphs for k modalities: $M = -\beta I + g A$ with $A$ the adjacency matrix of a graph.

Every graph here is undirected, so $M$ is symmetric and its eigenvalues are $-\beta + g\,a_j$ with
$a_j$ the adjacency eigenvalues, known in closed form:

| graph | $A$ | adjacency eigenvalues $a_j$ | stable couplings |
|---|---|---|---|
| `all_to_all` | $J - I$ | $k - 1$ (the uniform mode), $-1$ ($k - 1$ times) | $-\beta < g < \beta / (k - 1)$ |
| `ring` ($k \ge 3$) | cycle | $2\cos(2\pi j / k)$, $j = 0 \dots k-1$ | $-\beta / (2 c_k) < g < \beta / 2$ |
| `chain` | path | $2\cos(\pi j / (k + 1))$, $j = 1 \dots k$ | $\lvert g\rvert < \beta / (2\cos(\pi / (k + 1)))$ |
| `star` | hub and $k - 1$ leaves | $\pm\sqrt{k - 1}$, $0$ ($k - 2$ times) | $\lvert g\rvert < \beta / \sqrt{k - 1}$ |

For the ring, $c_k = 1$ for even $k$ and $\cos(\pi / k)$ for odd $k$. At $k = 2$, `all_to_all`, `chain` and
`star` are the symmetric M of eq (2).
"""

import jax.numpy as jnp
import numpy as np

from .._checks import as_float, concrete

GRAPHS = ("all_to_all", "ring", "chain", "star")


def _check_graph(graph: str, k) -> int:
    if graph not in GRAPHS:
        raise ValueError(f"`graph` must be one of {GRAPHS}, got {graph!r}.")
    if not (isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 2):
        raise ValueError(f"`k` (the number of modalities) must be an integer >= 2, got {k!r}.")
    if graph == "ring" and k < 3:
        raise ValueError(f"a `ring` needs k >= 3 modalities (k = 2 is the `chain`), got k = {k}.")
    return int(k)


def adjacency(graph: str, k: int) -> np.ndarray:
    """The `(k, k)` adjacency matrix of `graph` (0/1, symmetric, zero diagonal; the star's hub is modality 0)."""
    k = _check_graph(graph, k)
    A = np.zeros((k, k))
    if graph == "all_to_all":
        A = np.ones((k, k)) - np.eye(k)
    elif graph in ("ring", "chain"):
        i = np.arange(k - 1)
        A[i, i + 1] = A[i + 1, i] = 1.0
        if graph == "ring":
            A[0, k - 1] = A[k - 1, 0] = 1.0
    else:
        A[0, 1:] = A[1:, 0] = 1.0
    return A


def adjacency_eigenvalues(graph: str, k: int) -> np.ndarray:
    """The adjacency eigenvalues of `graph` in closed form (see the module table), in decreasing order."""
    k = _check_graph(graph, k)
    if graph == "all_to_all":
        a = np.array([k - 1.0] + [-1.0] * (k - 1))
    elif graph == "ring":
        a = 2 * np.cos(2 * np.pi * np.arange(k) / k)
    elif graph == "chain":
        a = 2 * np.cos(np.pi * np.arange(1, k + 1) / (k + 1))
    else:
        a = np.array([np.sqrt(k - 1.0), -np.sqrt(k - 1.0)] + [0.0] * (k - 2))
    return np.sort(a)[::-1]


def stability_interval(graph: str, k: int, beta) -> tuple:
    r"""`(g_lo, g_hi)`: the open interval of couplings $g$ for which every eigenvalue of $-\beta I + gA$ is
    negative (the forward process relaxes), in closed form: $g\,a_{max} < \beta$ and $g\,a_{min} < \beta$."""
    a = adjacency_eigenvalues(graph, k)
    beta = as_float(beta, "beta")
    b = concrete(beta)
    if b is not None and not np.all(b > 0):
        raise ValueError(f"`beta` must be > 0 (the modalities' own relaxation rate), got {b}.")
    return -beta / (-a.min()), beta / a.max()


def coupling_matrix(graph: str, k: int, beta, g):
    r"""$M = -\beta I_k + g A$ for `graph` (traceable in `beta` and `g`: sweep it under `vmap`). Raises when concrete
    `beta`, `g` lie outside [`stability_interval`][] (under `jit` the solvers report `unstable` instead)."""
    A = adjacency(graph, k)
    beta, g = as_float(beta, "beta"), as_float(g, "g")
    lo, hi = stability_interval(graph, k, beta)
    b, gg = concrete(beta), concrete(g)
    if b is not None and gg is not None and not (float(lo) < gg < float(hi)):
        raise ValueError(f"`g` = {float(gg):g} is outside the stable range of the {graph} coupling of k = {k} modalities with "
                         f"beta = {float(b):g}: the largest eigenvalue of M = -beta I + g A must be negative, which needs "
                         f"{float(lo):.6g} < g < {float(hi):.6g}.")
    dtype = jnp.result_type(beta, g)
    return -beta * jnp.eye(k, dtype=dtype) + g * jnp.asarray(A, dtype)
