"""Result codes, the small `Solution` PyTree, and the `throw=` boundary.

Solver-like functions never raise inside `jit`/`vmap`: they return a `Solution`
whose `result` says what happened. At the user boundary (`throw=True`, the
default) a failure raises: `ValueError` when the inputs are concrete (eager use),
or an Equinox runtime error when the call is being traced.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float


class RESULTS(optx.RESULTS):  # pyright: ignore
    no_speciation = (
        "No speciation: kappa(t) < 1 on the whole of [0, t_max] (eq 83), so the reverse "
        "drift never acquires extra fixed points. Increase the class separation (Gram "
        "matrix), decrease |g| or the data variances, or use the finite-d criterion "
        "(`dim=d`), whose threshold is 1/d."
    )
    speciation_beyond_t_max = (
        "kappa(t_max) >= 1: the speciation time lies beyond t_max (the reverse process "
        "would start already speciated). Increase `t_max`."
    )
    no_collapse = (
        "No collapse: alpha <= 0 means n^(2/d) <= 1, so there is no finite collapse time "
        "(eq 74-75). Pass alpha = log(n) / D > 0 (see `alpha_from_n`)."
    )
    collapse_out_of_range = (
        "The collapse condition is not crossed inside [t_min, t_max]. For a very large "
        "alpha decrease `t_min`; for a tiny alpha or a non-decaying M increase `t_max`."
    )
    non_confining = (
        "Non-confining reverse drift: M + sigma_W^2 C(t)^-1 is not positive stable for "
        "some t in [0, t_max] (eq 59), so sampling trajectories can diverge. For the "
        "symmetric M, eq (60) asks sigma^2 < sigma_W^2 / (beta + |g|): decrease the data "
        "variances or |g|, or increase sigma_W^2."
    )
    unstable = (
        "Unstable forward process: every eigenvalue of M needs a negative real part (the symmetric "
        "M of eq (2) needs beta > |g|, the anisotropic M of eq (3) beta > 0). Decrease |g| or increase beta."
    )
    grid_too_coarse = (
        "The bracketing grid step t_max / grid_size is too long for the drift's time scale "
        "(||M|| t_max / grid_size > 32). Increase `grid_size`."
    )
    invalid_parameters = (
        "Invalid parameters: a value is non-finite, sigma_W^2 or a variance is not "
        "positive, the Gram matrix is not positive semi-definite, or t_max <= 0."
    )
    coupling_out_of_range = (
        "The replica coupling strength g must lie in [0, 1]: eq (19) mixes the intra- and "
        "inter-replica attention with weights 1 - g/2 and g/2."
    )
    no_critical_point = (
        "No critical point: the top Fourier growth rate of the linearised reverse drift is negative on the "
        "whole of [t_min, t_max], so no mode is ever amplified. Decrease `t_min`, or the model has no "
        "instability (e.g. data less correlated than the prior)."
    )
    critical_beyond_t_max = (
        "The top growth rate is still >= 0 at t_max: the critical time lies beyond t_max. Increase `t_max`."
    )
    nonfinite_rate = (
        "The growth rate is not finite somewhere on the grid (a singular score, e.g. near t = 0 where "
        "Q(0) = 0): increase `t_min` or check the model's parameters."
    )
    not_mode_decomposable = (
        "The eigenmode formulas need a symmetric M and equal data variances "
        "(sigma_x^2 = sigma_y^2); use the general solver for this input."
    )


class Solution(eqx.Module):
    """The result of a theory solve (a time, usually).

    **Attributes:**

    - `value`: the solution; NaN when the solve did not succeed.
    - `result`: a [`RESULTS`][] code; `RESULTS[sol.result]` is a human-readable message.

    **Properties:**

    - `found`: boolean array, `True` where `result` is successful.
    """

    value: Float[Array, "..."]
    result: RESULTS

    @property
    def found(self):
        return self.result == RESULTS.successful

    @property
    def message(self) -> str:
        """The message of a scalar (non-batched) solution."""
        return RESULTS[self.result]


def first_failure(checks: Sequence[tuple], otherwise: RESULTS) -> RESULTS:
    """The code of the first failed check of `checks` (`(ok, code)` pairs, highest precedence first), else `otherwise`."""
    result = otherwise
    for ok, code in reversed(checks):
        result = RESULTS.where(ok, result, code)
    return result


def _is_traced(x) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def finish(value, result: RESULTS, *, throw: bool, what: str) -> Solution:
    """Mask failures with NaN and apply the `throw=` boundary."""
    value = jnp.where(result == RESULTS.successful, value, jnp.nan)
    sol = Solution(value=value, result=result)
    if not throw:
        return sol
    if _is_traced((value, result)):
        return result.error_if(sol, result != RESULTS.successful)
    codes = np.atleast_1d(np.asarray(result._value))
    bad = codes[codes != int(RESULTS.successful._value)]
    if bad.size:
        raise ValueError(f"{what}: {RESULTS._index_to_message[int(bad[0])]}")
    return sol
