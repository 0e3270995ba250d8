r"""Optimise coupling schedules by gradient: objectives and an optax loop with checkpoints.

```python
schedule = cd.PiecewiseLinear(knots, jnp.zeros(8), bound=0.9)     # |g(t)| < 0.9 by construction
objective = cd.speciation_objective(make_ou, data, target=4.0, dim=1024)  # (t_S - 4)^2
result = cd.optimize_schedule(objective, schedule, optimizer=optax.adam(0.05), steps=200, key=key,
                              checkpoint_dir="runs/ts")              # resumes if interrupted
result.schedule, result.history["loss"]
```

An objective is `objective(schedule, key) -> loss` or `-> (loss, aux)` with `aux` a dict of
scalars (recorded in the history). Everything differentiable in the schedule's inexact
array leaves is optimised (static fields such as knot times and bounds are not).
Theory-level objectives differentiate the root-finders through the implicit function
theorem and the moment ODE through diffrax; sample-level objectives differentiate the
exact-score sampler with its noise held fixed (reparameterisation).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checkpoint import Checkpoints
from ._results import RESULTS, Solution
from ._runlock import RunLock
from .sampling.trials import ConditionalTrials, trial_metrics
from .schedules import Constant
from .theory.collapse import collapse_time
from .theory.mixture import TwoClassMixture
from .theory.ou import CoupledOU
from .theory.speciation import speciation_time

_HINT = ("check that the speciation/collapse times the objective uses exist for these parameters "
         "(`Solution.found`; per-dimension kappa may never reach 1: pass `dim`), lower the learning rate, "
         "or bound the schedule (e.g. `bound=` below beta).")


class OptimizeResult(eqx.Module):
    """The optimised schedule and the per-step history (`loss` and any `aux` entries)."""

    schedule: object
    history: dict
    steps: int = eqx.field(static=True)


def _split(out):
    if isinstance(out, tuple):
        loss, aux = out
        return loss, dict(aux)
    return out, {}


def optimize_schedule(
    objective: Callable,
    schedule,
    *,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    key=None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 25,
    progress: bool = True,
) -> OptimizeResult:
    r"""Minimise `objective(schedule, key)` over the schedule's parameters with optax.

    **Arguments:**

    - `objective`: `objective(schedule, key) -> loss` or `(loss, aux)`; `key` is
        `fold_in(key, step)`, so a stochastic objective sees fresh noise every step and a
        resumed run sees exactly the noise the uninterrupted one would have.
    - `schedule`: the initial schedule (any PyTree; its inexact array leaves are trained).
    - `steps`: total optimisation steps.
    - `optimizer`: an optax transformation (default `optax.adam(0.05)`).
    - `key`: a PRNG key (default `jax.random.key(0)`).
    - `checkpoint_dir`: if given, the parameters, optimiser state, step and history are
        saved there every `checkpoint_every` steps with orbax (atomic: a checkpoint is
        written to a temporary directory and renamed), and an existing checkpoint is
        resumed from: the result equals that of an uninterrupted run. The directory is locked
        while the loop runs ([`RunLock`][]): a second writer stops with `RunLockedError`.
    - `progress`: show a tqdm bar with the loss.

    **Returns:** an [`OptimizeResult`][] with the final schedule and `history` (arrays of
    length `steps`: `loss` and each `aux` entry, evaluated before each update).
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"`checkpoint_every` must be a positive integer, got {checkpoint_every!r}.")
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    key = jax.random.key(0) if key is None else key
    if checkpoint_dir is None:
        return _optimize(objective, schedule, steps, optimizer, key, None, checkpoint_every, progress)
    with RunLock(checkpoint_dir, "schedule optimisation"):  # one writer per checkpoint directory
        return _optimize(objective, schedule, steps, optimizer, key, checkpoint_dir, checkpoint_every, progress)


def _optimize(objective, schedule, steps, optimizer, key, checkpoint_dir, checkpoint_every, progress) -> OptimizeResult:
    params, static = eqx.partition(schedule, eqx.is_inexact_array)
    if not jax.tree.leaves(params):
        raise ValueError("The schedule has no trainable (inexact array) parameters.")

    def loss_fn(p, k):
        return _split(objective(eqx.combine(p, static), k))

    # the aux keys and a check that the loss is a scalar, from shapes alone (no evaluation)
    loss0, aux0 = eqx.filter_eval_shape(loss_fn, params, jax.random.fold_in(key, 0))
    if loss0.shape != ():
        raise ValueError(f"The objective must return a scalar loss, got shape {loss0.shape}.")
    names = ["loss"] + sorted(aux0)

    @eqx.filter_jit
    def step_fn(p, opt_state, i):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, jax.random.fold_in(key, i))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return p, opt_state, jnp.stack([loss] + [aux[n] for n in names[1:]])

    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(0)}
    history = np.full((steps, len(names)), np.nan)
    ckpts = None
    if checkpoint_dir is not None:
        ckpts = Checkpoints(checkpoint_dir, keep=2, doc_item="history")
        latest = ckpts.latest()
        if latest is not None and latest > steps:
            raise ValueError(f"{checkpoint_dir} holds a run at step {latest}, beyond steps={steps}.")

        def same_objective(saved: dict) -> None:
            if saved["names"] != names:
                raise ValueError(f"{checkpoint_dir} was written by an objective recording {saved['names']}, not {names}.")

        found = ckpts.restore_newest(state, check_doc=same_objective, set_aside=True)  # verified; past damage falls back
        if found is not None:
            _, state, saved = found
            past = np.asarray(saved["values"], float)
            history[: len(past)] = past
    start = int(state["step"])
    p, opt_state = state["params"], state["opt_state"]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="optimize_schedule", leave=False)
    try:
        for i in range(start, steps):
            try:
                p_new, opt_state_new, rec = step_fn(p, opt_state, jnp.asarray(i))  # traced: one compile
            except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError) as err:
                # e.g. a NaN cotangent reaching an implicit-function linear solve (a root not found)
                raise FloatingPointError(f"The objective or its gradient was not finite at step {i}: {_HINT}") from err
            history[i] = np.asarray(rec)
            if not np.isfinite(history[i, 0]):
                raise FloatingPointError(f"The objective returned {history[i, 0]}, not finite at step {i}: {_HINT}")
            p, opt_state = p_new, opt_state_new
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history[i, 0]:.4g}")
            if ckpts is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == steps):
                ckpts.save(i + 1, {"params": p, "opt_state": opt_state, "step": jnp.asarray(i + 1)},
                           {"names": names, "values": history[: i + 1].tolist()})
    finally:  # pending saves are finished, also when a step fails
        if ckpts is not None:
            ckpts.close()
        if bar is not None:
            bar.close()
    return OptimizeResult(eqx.combine(p, static), {n: history[:, j] for j, n in enumerate(names)}, steps)


# ---------------------------------------------------------------------------------------
# Theory-level objectives


def speciation_objective(make_ou: Callable, data: TwoClassMixture, *, target, t_max=10.0, dim=None):
    r"""$(t_S - \text{target})^2$ for `make_ou(schedule)`; aux: `t_s`."""

    def objective(schedule, key):
        t_s = speciation_time(make_ou(schedule), data, t_max=t_max, dim=dim, throw=False).value
        return (t_s - target) ** 2, {"t_s": t_s}

    return objective


class _ModeDrift(eqx.Module):
    # symmetric M(t) = -beta I + g(t) [[0, 1], [1, 0]] commutes with itself at all times, so its
    # eigenmodes v_+- = (1, +-1)/sqrt2 decouple exactly: each is a 1-D OU with lambda(t) = -beta +- g(t)
    beta: jax.Array
    schedule: object
    sign: float = eqx.field(static=True)

    def __call__(self, t):
        return jnp.reshape(-self.beta + self.sign * self.schedule(t), (1, 1))

    @property
    def jump_ts(self):
        return getattr(self.schedule, "jump_ts", None)


def _mode_process(beta, schedule, sigma_w2, sign):
    return CoupledOU(_ModeDrift(jnp.asarray(beta, float), schedule, sign), sigma_w2)


def schedule_mode_speciation_times(beta, schedule, sigma_w2, data: TwoClassMixture, *, t_max=10.0, dim=None):
    r"""Speciation times $(t_{S+}, t_{S-})$ of the common and difference modes under a symmetric $M(t)$.

    The modes of $M(t) = -\beta I + g(t)\sigma_x$ do not depend on $t$, so each is a
    one-dimensional OU process with $\lambda_\pm(t) = -\beta \pm g(t)$ and
    $m_\pm^2 = v_\pm^\top G_0 v_\pm$ (eq 50-66 with a time-dependent $g$). Needs equal
    data variances. Returns two [`Solution`][]s; check `found`. A concrete schedule that
    reaches $|g(t)| \ge \beta$ raises (as [`CoupledOU.symmetric`][]); under `jit` both
    solutions report `unstable` instead.
    """
    stable = CoupledOU.symmetric(beta, schedule, sigma_w2).stable()  # |g(t)| < beta, where the schedule knows its sup
    v = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
    m2 = jnp.diagonal(v.T @ data.gram @ v)
    var = data.variances[0]
    out = []
    for i, sign in enumerate((1.0, -1.0)):
        mode = TwoClassMixture(jnp.reshape(m2[i], (1, 1)), jnp.reshape(var, (1,)))
        sol = speciation_time(_mode_process(beta, schedule, sigma_w2, sign), mode, t_max=t_max, dim=dim, throw=False)
        result = RESULTS.where(stable, sol.result, RESULTS.unstable)
        out.append(Solution(jnp.where(stable, sol.value, jnp.nan), result))
    return tuple(out)


def gap_objective(beta, sigma_w2, data: TwoClassMixture, *, target_gap, t_max=10.0, dim=None):
    r"""$(t_{S+} - t_{S-} - \text{target})^2$: widen or close the synchronization gap; aux: `t_s_plus`, `t_s_minus`, `gap`."""

    def objective(schedule, key):
        plus, minus = schedule_mode_speciation_times(beta, schedule, sigma_w2, data, t_max=t_max, dim=dim)
        gap = plus.value - minus.value
        return (gap - target_gap) ** 2, {"t_s_plus": plus.value, "t_s_minus": minus.value, "gap": gap}

    return objective


def speciation_with_collapse_objective(
    make_ou: Callable, data: TwoClassMixture, *, target, alpha, tolerance, reference_ou, t_max=10.0, weight=100.0,
):
    r"""Move $t_S$ to `target` while keeping the joint collapse time within `tolerance` of `reference_ou`'s.

    Loss $(t_S - \text{target})^2 + w\,\max(0, |t_C - t_C^{ref}| - \text{tol})^2$; aux: `t_s`, `t_c`.
    """
    t_c_ref = collapse_time(reference_ou, data, alpha=alpha, throw=False).value

    def objective(schedule, key):
        ou = make_ou(schedule)
        t_s = speciation_time(ou, data, t_max=t_max, throw=False).value
        t_c = collapse_time(ou, data, alpha=alpha, throw=False).value
        excess = jnp.maximum(jnp.abs(t_c - t_c_ref) - tolerance, 0.0)
        return (t_s - target) ** 2 + weight * excess**2, {"t_s": t_s, "t_c": t_c}

    return objective


# ---------------------------------------------------------------------------------------
# Sample-level objective: the Appendix C metrics through the differentiable sampler


def alignment_objective(
    theta,
    *,
    nll_weight: float = 0.0,
    mse_weight: float = 0.0,
    surrogate: str = "soft",
    sharpness: float = 1.0,
    nll_budget: float | None = None,
    penalty: float = 10.0,
    n_trials: int = 256,
    resample: bool = True,
    key=None,
    **trial_kwargs,
):
    r"""Appendix C through the exact-score sampler: raise the alignment accuracy, penalise the NLL.

    Each call runs the reverse $Y$ sampler (eq 143) on `n_trials` trials at mean angle
    `theta` (see [`ConditionalTrials`][]). With $p = \sigma(2 s_x \mu_y^\top y_0/\sigma_y^2)$,
    the posterior probability that $y_0$ has $x_0$'s class (a smooth counterpart of the
    sign-agreement accuracy), the loss is $-\bar p$ (`surrogate="soft"`, bounded like the
    accuracy itself) or $\overline{-\log p}$ (`"cross_entropy"`, which also punishes
    confident disagreement and so favours different schedules), plus `nll_weight` times
    the NLL of eq (146) and `mse_weight` times the MSE of eq (145). `sharpness` $a$
    replaces $p$ by $\sigma(a \cdot 2 s_x \mu_y^\top y_0/\sigma_y^2)$: as $a$ grows the
    surrogate approaches the 0/1 accuracy (and its gradient concentrates on trials near
    the decision boundary).
    Gradients flow through the sampler with its noise held fixed (reparameterisation) and
    through the moment ODE of the schedule.

    - `nll_budget`: if given, a constraint on the NLL *increase* over the uncoupled
        sampler on the same trials (run alongside, without gradient): the loss gains
        `penalty` $\cdot \max(0, \overline{\Delta\mathrm{NLL}} - \text{budget})^2$. With a
        budget of 0 this asks for accuracy at no cost in NLL ("do no harm").
    - `resample=True`: fresh trials from the step's key each call (unbiased stochastic
        gradients); `False`: the same trials, drawn from `key`, every call (a deterministic
        sample-average objective; all schedules are compared on common random numbers).
    - `trial_kwargs`: passed to [`ConditionalTrials.draw`][] (`dim`, `m2`, `beta`,
        `sigma_w2`, `t_max`, `n_steps`, ...).

    aux: `acc`, `soft_acc`, `nll`, `mse` (batch means), and `d_nll` with a budget.
    """
    if not (isinstance(n_trials, int) and n_trials >= 2):
        raise ValueError(f"`n_trials` must be an integer >= 2, got {n_trials!r}.")
    if surrogate not in ("soft", "cross_entropy"):
        raise ValueError(f"`surrogate` must be 'soft' or 'cross_entropy', got {surrogate!r}.")
    fixed = None
    if not resample:
        fixed = ConditionalTrials.draw(jax.random.key(0) if key is None else key, theta, n_trials=n_trials, **trial_kwargs)

    def objective(schedule, key):
        trials = fixed if fixed is not None else ConditionalTrials.draw(key, theta, n_trials=n_trials, **trial_kwargs)
        m = trial_metrics(schedule, trials)
        p = jax.nn.sigmoid(sharpness * m["margin"])
        fit = -jnp.mean(p) if surrogate == "soft" else -jnp.mean(jax.nn.log_sigmoid(sharpness * m["margin"]))
        nll = jnp.mean(m["nll"])
        aux = {"acc": jnp.mean(m["acc"]), "soft_acc": jnp.mean(m["soft_acc"]), "nll": nll, "mse": jnp.mean(m["mse"])}
        loss = fit + nll_weight * nll + mse_weight * aux["mse"]
        if nll_budget is not None:
            ref = jax.lax.stop_gradient(trial_metrics(Constant(jnp.zeros((), trials.means.dtype)), trials)["nll"])
            aux["d_nll"] = jnp.mean(m["nll"] - ref)  # paired: far less noisy than the NLL itself
            loss = loss + penalty * jnp.maximum(aux["d_nll"] - nll_budget, 0.0) ** 2
        return loss, aux

    return objective
