r"""One training step of the eps-prediction U-Net under mode-shaped noise (Section 5, eq 94-96), jitted.

1. the batch is gathered on the device from the epoch's indices (`PairedMNIST.batch`),
2. `t ~ U{0..T-1}`, $\varepsilon \sim$ `ModeNoise.paired(g)`, $z_t$ by eq (94),
3. the loss eq (96) (optionally whitened), its gradient, global-norm clipping, AdamW with a
   linear warm-up and cosine decay (optax), and an EMA of the parameters.

Everything random is a function of `(seed, step)`. A non-finite loss or gradient leaves the
state unchanged and records the step in `bad_step`, which the loop checks at its log points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..data.pairing import PairedMNIST
from .build import build_noise, build_optimizer
from .config import ModelConfig, NoiseConfig, OptimizerConfig, RunConfig
from .noise import add_noise, eps_loss


def initial_state(model: nnx.Module, tx: optax.GradientTransformation):
    """The training state of a fresh model: parameters, the other variables, optimiser state, EMA, step, `bad_step`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = dict(params=params, rest=rest, opt=tx.init(params), ema=jax.tree.map(jnp.copy, params),
                 step=jnp.int32(0), bad_step=jnp.int32(-1))
    return graphdef, state


@functools.lru_cache(maxsize=8)
def compiled_step(graphdef, treedef, noise: NoiseConfig, model: ModelConfig, optimizer: OptimizerConfig, run: RunConfig):
    """The jitted step on the *flat leaves* of the state, cached on the graph, the state's structure and the
    configuration parts the step uses.

    Called as `step(leaves, data, epoch_a, epoch_b, i) -> (leaves, metrics)` with the epoch's
    index arrays `(steps_per_epoch, B)` and the step's row `i` in them; the input leaves are
    donated. Per call, jit only flattens a list of arrays: passing the NNX state itself (and
    `graphdef` as a static argument) cost about 6 ms per step on the host (re-creating every
    `nnx.Variable` of the output and hashing the graphdef), which dominated small models.
    """

    def step(leaves, data, epoch_a, epoch_b, i):
        a, b = epoch_a[i], epoch_b[i]
        state = jax.tree.unflatten(treedef, leaves)
        new, metrics = train_step(state, data, a, b, graphdef=graphdef, noise=noise, model=model, optimizer=optimizer, run=run)
        new_leaves, new_def = jax.tree.flatten(new)
        assert new_def == treedef, "the training step changed the state's structure"
        return new_leaves, metrics

    return jax.jit(step, donate_argnums=0)


def train_step(state, data: PairedMNIST, a, b, *, graphdef, noise: NoiseConfig, model: ModelConfig, optimizer: OptimizerConfig,
               run: RunConfig):
    """One step on the pairs `(a[i], b[i])` of `data` (traced inside [`compiled_step`][]); returns `(state, metrics)`."""
    schedule, law = build_noise(noise)
    tx = build_optimizer(optimizer, run.steps)
    dropout = model.dropout > 0

    def loss_fn(params, rest, zt, t, eps, key):
        net = nnx.merge(graphdef, params, rest)
        eps_hat = net(zt, t, train=dropout, rngs=key if dropout else None)
        return eps_loss(eps_hat, eps, law, whitened=noise.whitened_loss)

    key = jax.random.fold_in(jax.random.key(run.seed), state["step"])
    k_swap, k_t, k_eps, k_drop = jax.random.split(key, 4)
    z0 = data.batch(a, b, k_swap)
    t = jax.random.randint(k_t, (a.shape[0],), 0, schedule.T)
    eps = law.sample(k_eps, z0.shape)
    zt = add_noise(schedule, z0, eps, t)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], state["rest"], zt, t, eps, k_drop)
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = optimizer.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)  # a bad step changes nothing and is remembered
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new = dict(params=keep(params, state["params"]), rest=state["rest"], opt=keep(opt_state, state["opt"]),
               ema=keep(ema, state["ema"]), step=state["step"] + 1,
               bad_step=jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], state["step"]))
    return new, {"loss": loss, "grad_norm": gnorm}
