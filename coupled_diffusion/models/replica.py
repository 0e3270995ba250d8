r"""Replica coupling inside DiT self-attention (the synchronization-gap DiT paper, Section 2 and 3).

Two replicas of one DiT run side by side; in the coupled blocks each replica's queries attend to
both replicas' keys, with a separate row-wise softmax per block of the joint logit matrix (eq 18)
and a normalised mixture of the intra- and inter-replica outputs (eq 19):

$$O_a = (1 - g/2)\,\mathrm{softmax}\!\left(\frac{Q_a K_a^\top}{\sqrt d}\right) V_a
      + \frac g2\,\mathrm{softmax}\!\left(\frac{Q_a K_b^\top}{\sqrt d}\right) V_b, \qquad b \ne a,\ g \in [0, 1].$$

With these weights the value-routing part of the linearised difference mode $O_1 - O_2$ (eq 25)
carries $(1 - g)$ (vanishing at $g = 1$) and the kernel-modulation part $(1 - g/2)$, as Section 2.3
states; at $g = 0$ nothing is shared, not even a partition function, so each replica is exactly
the uncoupled DiT. (The extracted paper text lost the formulas; this is our reading of its prose,
recorded in the README.)

```python
out = cd.replica_attention(q, k, v, g)                   # q, k, v: (2, B, heads, tokens, head_dim)
eps, hidden = cd.coupled_dit(model, x_pair, t, y, g=0.5, return_hidden=True)   # x_pair: (2, B, H, W, C)
z1, z2 = cd.replica_init(key, z, eps=0.1)                # eq (67-69): correlation 1 - 2 eps
```
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._checks import concrete
from .._results import RESULTS, Solution
from .dit import softmax_attention

__all__ = ["coupled_dit", "replica_attention", "replica_init"]


def _unit_scalar(x, name: str, what: str, why: str, dtype=None, batch: tuple[int, ...] | None = None):
    """`x` as a floating array; a `ValueError` naming `name` unless it is a scalar (or, with `batch`, an
    array of that shape: one value per pair) and, when concrete, finite and in [0, 1]. A traced value
    is returned unchecked, for a run-time check."""
    x = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
    if x.ndim != 0 and (batch is None or x.shape != tuple(batch)):
        shapes = "a scalar" if batch is None else f"a scalar or one value per pair, shape {tuple(batch)},"
        raise ValueError(f"`{name}` must be {shapes}{' ' + what if what else ''} in [0, 1], got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    v = concrete(x)
    if v is not None and not (np.all(np.isfinite(v)) and np.all((0 <= v) & (v <= 1))):
        raise ValueError(f"`{name}` must be {'a ' + what if what else 'a scalar'} in [0, 1] ({why}), got {v.tolist()}.")
    return x


def _check_g(g, name: str = "g", batch: tuple[int, ...] | None = None):
    return _unit_scalar(g, name, "coupling strength", "eq 19's weights 1 - g/2 and g/2", batch=batch)


def replica_attention(q: Float[Array, "2 *batch heads nq d"], k: Float[Array, "2 *batch heads nk d"],
                      v: Float[Array, "2 *batch heads nk d"], g, *, throw: bool = True):
    r"""Blockwise-softmax replica attention (eq 16-19): for each replica a (axis 0) and the other b,
    $(1 - g/2)\,\mathrm{softmax}(Q_a K_a^\top/\sqrt d) V_a + (g/2)\,\mathrm{softmax}(Q_a K_b^\top/\sqrt d) V_b$.

    **Arguments:**

    - `q`, `k`, `v`: replica first, then any batch axes, heads, tokens, head dimension; `k` and `v`
      of one shape, `q` with the same leading axes and head dimension.
    - `g`: the coupling strength in [0, 1] (0: two independent attentions; 1: each replica's output
      is the even mixture of attending to itself and to the other): a scalar, or one value per pair,
      shaped like the batch axes `q.shape[1:-3]` (a sweep over couplings in one batch).
    - `throw`: with concrete `g` outside [0, 1] a `ValueError` is raised whatever `throw` says; a
      traced `g` is checked at run time, raising (`throw=True`) or, with `throw=False`, giving a
      [`Solution`][] whose `value` is NaN and whose `result` is `RESULTS.coupling_out_of_range`.

    **Returns:** the outputs, shaped like `q` (a [`Solution`][] with `throw=False`).
    """
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    if q.ndim < 4 or q.shape[0] != 2:
        raise ValueError(f"`q` must be (2, *batch, heads, tokens, head_dim) with the two replicas first; got shape {q.shape}.")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"`k` and `v` must share a shape with `q`'s leading axes and head dimension; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}.")
    g = _check_g(g, batch=q.shape[1:-3])
    intra = softmax_attention(q, k, v)
    inter = softmax_attention(q, k[::-1], v[::-1])
    gv = g.astype(intra.dtype).reshape(g.shape + (1, 1, 1))
    out = (1 - gv / 2) * intra + (gv / 2) * inter
    ok = jnp.all(jnp.isfinite(g) & (g >= 0) & (g <= 1))
    result = RESULTS.where(ok, RESULTS.successful, RESULTS.coupling_out_of_range)
    if throw:
        return result.error_if(out, ~ok) if isinstance(g, jax.core.Tracer) else out
    return Solution(value=jnp.where(ok, out, jnp.nan), result=result)


def replica_init(key, z: Float[Array, "..."], eps) -> tuple[Array, Array]:
    r"""The antisymmetric, variance-preserving replica pair of eq (67):
    $z_{1,2} = \sqrt{1-\epsilon}\,z \pm \sqrt{\epsilon}\,\xi$, $\xi \sim N(0, I)$ independent of `z`.

    For `z` with unit-variance entries each replica keeps unit variance, their difference is
    $2\sqrt\epsilon\,\xi$ (eq 68), and their correlation is $1 - 2\epsilon$ (eq 69): identical at
    $\epsilon = 0$, independent at 1/2, anti-correlated above. `eps` must lie in [0, 1].
    """
    z = jnp.asarray(z)
    eps = _unit_scalar(eps, "eps", "", "replica correlation 1 - 2 eps", z.dtype)
    xi = jax.random.normal(key, z.shape, z.dtype)
    a, b = jnp.sqrt(1 - eps), jnp.sqrt(eps)
    return a * z + b * xi, a * z - b * xi


def coupled_dit(model, x, t, y=None, *, g, blocks=None, return_hidden: bool = False):
    r"""Run a [`DiT`][] as a coupled replica pair: the same parameters, replica attention (eq 19) with
    strength `g` in the blocks `blocks` (indices; default every block), plain attention elsewhere.

    **Arguments:**

    - `model`: a `cd.DiT` (built here or loaded with `load_dit_diffusers` / `load_dit_official`).
    - `x`: (2, B, H, W, C), the two replicas' inputs, replica first.
    - `t`: (B,) or (2, B) timesteps; `y`: (B,) or (2, B) labels when the model is class-conditional.
    - `g`: coupling strength in [0, 1], a scalar or one per pair (B,) (a traced `g` is checked at run time).
    - `return_hidden`: also return each block's token states, (depth, 2, B, N, D).

    **Returns:** (2, B, H, W, C_out), and the hidden states if asked. At `g = 0` each replica's
    output is the uncoupled `model(x[r], t, y)` to float rounding; swapping the replicas swaps the
    outputs.
    """
    x = jnp.asarray(x)
    if x.ndim != 5 or x.shape[0] != 2:
        raise ValueError(f"`x` must be (2, B, H, W, C), the two replicas first; got shape {x.shape}.")
    b = x.shape[1]
    depth = len(model.blocks)
    chosen = tuple(range(depth)) if blocks is None else tuple(sorted({int(i) for i in blocks}))
    if any(not 0 <= i < depth for i in chosen):
        raise ValueError(f"`blocks` must be block indices in [0, {depth}); got {blocks}.")

    def pair(a, name):
        if a is None:
            return None
        a = jnp.asarray(a)
        if a.ndim == 0:
            a = jnp.broadcast_to(a, (b,))
        if a.shape == (b,):
            return jnp.concatenate([a, a])
        if a.shape == (2, b):
            return a.reshape(2 * b)
        raise ValueError(f"`{name}` must be a scalar, (B,) = ({b},) or (2, B) = (2, {b}); got shape {a.shape}.")

    g = _check_g(g, batch=(b,))
    out = model(x.reshape((2 * b,) + x.shape[2:]), pair(t, "t"), pair(y, "y"), replica_g=g, replica_blocks=chosen,
                 return_hidden=return_hidden)
    if return_hidden:
        out, hidden = out
        return out.reshape((2, b) + out.shape[1:]), hidden.reshape((hidden.shape[0], 2, b) + hidden.shape[2:])
    return out.reshape((2, b) + out.shape[1:])
