r"""Training an eps-prediction U-Net on two-channel MNIST under mode-shaped noise (Section 5, eq 94-96).

`train(config, out_dir)` runs (or resumes) a run and returns its `TrainResult`. One step:

1. the batch is gathered on the device from the epoch's indices (`PairedMNIST.batch`),
2. `t ~ U{0..T-1}`, $\varepsilon \sim$ `ModeNoise.paired(g)`, $z_t$ by eq (94),
3. the loss eq (96) (optionally whitened), its gradient, global-norm clipping, AdamW with a
   linear warm-up and cosine decay (optax), and an EMA of the parameters.

The step is a plain `jax.jit` over the flat leaves of the split NNX state (no per-call graph
traversal or `nnx.Variable` re-creation), with the batch split over all devices (data
parallel; parameters replicated); each epoch's order goes to the device once. Everything random is a
function of `(seed, step)` and the data order of `(seed, epoch)`, so a run resumed from a
checkpoint continues *exactly* as if it had not stopped (tested bit for bit).

Checkpoints (orbax, atomic, the last `keep`) hold the parameters, the EMA, the optimizer
state, the step (which fixes the RNG state and the data position: epoch and offset), the
configuration and the library version. A non-finite loss or gradient leaves the parameters
untouched on the device, and the run stops with `FloatingPointError` at the next log point,
keeping the last good checkpoint. Progress goes to a tqdm bar (loss, images/s), to
`metrics.jsonl` and to `loss.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..data.mnist import load_mnist
from ..data.pairing import PairedMNIST
from ..models.sharding import data_mesh
from ..models.unet import UNet
from .noise import ModeNoise, VPSchedule, add_noise, eps_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The defaults train a small MNIST two-channel model on 2 CPU cores
    in about 15 minutes; `TrainConfig.paper()` gives the paper's scale (T = 200, 20 epochs) for an
    accelerator.
    """

    # data
    transform: str = "edge"
    pairing: str = "main"
    classes: tuple[int, ...] | None = None
    data_path: str | None = None
    n_train: int | None = None  # use the first n training images (None: all 50,000)
    # diffusion
    T: int = 200
    schedule: str = "linear"
    g: float = 0.3
    whitened_loss: bool = False
    # model
    block_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, True)
    num_groups: int = 8
    attention_head_dim: int = 8
    dropout: float = 0.0
    bf16: bool = False
    # optimisation
    batch_size: int = 64
    steps: int = 3000
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    # bookkeeping
    log_every: int = 25
    ckpt_every: int = 250
    keep: int = 3

    @classmethod
    def paper(cls, **overrides) -> TrainConfig:
        """The paper's setting: the (32, 64, 64) U-Net, T = 200, 20 epochs of the 50,000 images at batch 128."""
        kw = dict(block_channels=(32, 64, 64), T=200, batch_size=128, steps=20 * (50_000 // 128), lr=2e-4, warmup_steps=500,
                  ema_decay=0.999, log_every=50, ckpt_every=1000)
        return cls(**(kw | overrides))

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(abs(self.g) < 1, f"`g` must satisfy |g| < 1 (eq 92), got {self.g}.")
        need(self.pairing in ("main", "ctrl"), f"`pairing` must be 'main' or 'ctrl', got {self.pairing!r}.")
        need(self.schedule in ("linear", "cosine"), f"`schedule` must be 'linear' or 'cosine', got {self.schedule!r}.")
        need(self.T >= 2, f"`T` must be >= 2, got {self.T}.")
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "keep"):
            need(getattr(self, name) >= 1, f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        need(self.lr > 0 and self.warmup_steps >= 0, f"need `lr` > 0 and `warmup_steps` >= 0, got {self.lr}, {self.warmup_steps}.")
        need(0 <= self.ema_decay < 1, f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        need(len(self.attention) == len(self.block_channels),
             f"`attention` needs one flag per level ({len(self.block_channels)}), got {self.attention}.")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown configuration fields {sorted(unknown)}.")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the model with the EMA weights (for sampling), the raw model, the history."""

    model: UNet
    ema_model: UNet
    config: TrainConfig
    step: int
    history: list[dict]
    out_dir: Path | None


def build_model(config: TrainConfig, *, key: int | None = None) -> UNet:
    return UNet(in_channels=2, block_channels=config.block_channels, layers_per_block=config.layers_per_block,
                attention=config.attention, num_groups=config.num_groups, attention_head_dim=config.attention_head_dim,
                dropout=config.dropout, dtype=jnp.bfloat16 if config.bf16 else None,
                rngs=nnx.Rngs(config.seed if key is None else key))


def build_data(config: TrainConfig) -> PairedMNIST:
    x, y = load_mnist("train", config.data_path)
    if config.n_train is not None:
        x, y = x[: config.n_train], y[: config.n_train]
    return PairedMNIST(x, y, transform=config.transform, pairing=config.pairing, classes=config.classes)


def _lr(config: TrainConfig):
    """Linear warm-up to `lr`, then cosine decay to `lr / 100` at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, max(config.warmup_steps, 1),
                                              max(config.steps, config.warmup_steps + 1), end_value=config.lr * 0.01)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adamw(_lr(config), weight_decay=config.weight_decay))


@functools.lru_cache(maxsize=8)
def _compiled_step(graphdef, config: TrainConfig, treedef):
    """The jitted step on the *flat leaves* of the state, cached on `(graphdef, config, treedef)`.

    Per call, jit then only flattens a list of arrays: passing the NNX state itself (and
    `graphdef` as a static argument) cost about 6 ms per step on the host (re-creating every
    `nnx.Variable` of the output and hashing the graphdef), which dominated small models.
    """

    def step(leaves, data, epoch_a, epoch_b, i):
        a, b = epoch_a[i], epoch_b[i]
        new, metrics = _train_step(jax.tree.unflatten(treedef, leaves), data, a, b, graphdef=graphdef, config=config)
        new_leaves, new_def = jax.tree.flatten(new)
        assert new_def == treedef, "the training step changed the state's structure"
        return new_leaves, metrics

    return jax.jit(step, donate_argnums=0)


def _train_step(state, data: PairedMNIST, a, b, *, graphdef, config: TrainConfig):
    """One training step (traced inside `_compiled_step`)."""
    schedule, noise, tx = VPSchedule.named(config.schedule, config.T), ModeNoise.paired(config.g), _optimizer(config)

    def loss_fn(params, rest, zt, t, eps, key):
        model = nnx.merge(graphdef, params, rest)
        eps_hat = model(zt, t, train=config.dropout > 0, rngs=key if config.dropout > 0 else None)
        return eps_loss(eps_hat, eps, noise, whitened=config.whitened_loss)

    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    k_swap, k_t, k_eps, k_drop = jax.random.split(key, 4)
    z0 = data.batch(a, b, k_swap)
    t = jax.random.randint(k_t, (a.shape[0],), 0, schedule.T)
    eps = noise.sample(k_eps, z0.shape)
    zt = add_noise(schedule, z0, eps, t)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], state["rest"], zt, t, eps, k_drop)
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, state["ema"], params)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)  # a bad step changes nothing and is remembered
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new = dict(params=keep(params, state["params"]), rest=state["rest"], opt=keep(opt_state, state["opt"]),
               ema=keep(ema, state["ema"]), step=state["step"] + 1,
               bad_step=jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], state["step"]))
    return new, {"loss": loss, "grad_norm": gnorm}


def _ckpt_manager(out_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(out_dir.resolve() / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _library_version() -> str:
    from .. import __version__

    return __version__


def train(config: TrainConfig = TrainConfig(), out_dir: str | Path | None = None, *, data: PairedMNIST | None = None,
          resume: bool = True, progress: bool = True, mesh=None, stop_at: int | None = None,
          callback: Callable[[int, dict], Any] | None = None) -> TrainResult:
    """Train (or resume) a run; see the module docstring.

    Arguments:
        config: the `TrainConfig`.
        out_dir: where checkpoints, `config.json`, `metrics.jsonl` and `loss.png` go (None: nothing is
            written and nothing resumed).
        data: a `PairedMNIST` to use instead of building one from `config` (tests, custom data).
        resume: continue from the latest checkpoint in `out_dir` if there is one (its configuration
            must equal `config`).
        progress: show a tqdm progress bar.
        mesh: a 1-D device mesh for data parallelism (default: all devices).
        stop_at: stop (after checkpointing) when this step is reached, before `config.steps`;
            what a killed run looks like, for tests.
        callback: called as `callback(step, metrics)` at every log point.
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    data = build_data(config) if data is None else data
    B = config.batch_size
    steps_per_epoch = len(data) // B
    if steps_per_epoch == 0:
        raise ValueError(f"`batch_size` ({B}) is larger than the data set ({len(data)} pairs).")
    mesh = data_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if B % n_dev:
        raise ValueError(f"`batch_size` ({B}) must be a multiple of the number of devices ({n_dev}).")
    model = build_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(config)
    state = dict(params=params, rest=rest, opt=tx.init(params), ema=jax.tree.map(jnp.copy, params),
                 step=jnp.int32(0), bad_step=jnp.int32(-1))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state, replicated)
    data = jax.device_put(data, replicated)

    manager = None
    history: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        manager = _ckpt_manager(out, config.keep)
        latest = manager.latest_step() if resume else None
        if latest is not None:
            state, history = _restore(manager, latest, state, config, out)
        if (out / "metrics.jsonl").exists():  # drop records past the checkpoint (a run killed between checkpoints)
            keep_to = latest or 0
            lines = [x for x in (out / "metrics.jsonl").read_text().splitlines() if x and json.loads(x)["step"] <= keep_to]
            (out / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=1))
    # the compiled step is cached on the fields it depends on; bookkeeping and data fields are normalised away
    step_config = dataclasses.replace(config, log_every=1, ckpt_every=1, keep=1, data_path=None, n_train=None,
                                      transform="edge", pairing="main", classes=None)
    leaves, treedef = jax.tree.flatten(state)
    step_fn = _compiled_step(graphdef, step_config, treedef)
    epoch_sharding = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names[0]))

    start = int(state["step"])
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    epoch_cache: dict[int, tuple[jax.Array, jax.Array]] = {}

    def indices(step):
        # the epoch's order goes to the device once, as (steps_per_epoch, B) arrays split over the batch axis
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            a, b = data.epoch_indices(config.seed, epoch)
            n = steps_per_epoch * B
            epoch_cache[epoch] = (jax.device_put(a[:n].reshape(steps_per_epoch, B), epoch_sharding),
                                  jax.device_put(b[:n].reshape(steps_per_epoch, B), epoch_sharding))
        return (*epoch_cache[epoch], np.int32(i))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    metrics_file = (out / "metrics.jsonl").open("a") if out is not None else None
    t_last, n_last = time.perf_counter(), start
    pending = []
    try:
        for s in range(start, end):
            leaves, m = step_fn(leaves, data, *indices(s))
            pending.append(m)
            done = s + 1
            if done % config.log_every == 0 or done == end or (manager and done % config.ckpt_every == 0):
                state = jax.tree.unflatten(treedef, leaves)
                bad = int(state["bad_step"])
                losses = np.array([float(p["loss"]) for p in pending])
                gn = float(pending[-1]["grad_norm"])
                pending.clear()
                if bad >= 0:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {bad} (learning rate {config.lr}); the parameters were not "
                        f"updated from that step on"
                        + (f", and the last good checkpoint (step {manager.latest_step()}) is kept in {out}/checkpoints."
                           if manager and manager.latest_step() is not None else ".")
                        + " Lower `lr`, raise `warmup_steps` or tighten `grad_clip`.")
                now = time.perf_counter()
                rate = (done - n_last) * B / max(now - t_last, 1e-9)
                t_last, n_last = now, done
                rec = dict(step=done, epoch=done / steps_per_epoch, loss=float(losses.mean()), grad_norm=gn,
                           lr=float(_lr(config)(done)), img_per_s=rate, time=time.time())
                history.append(rec)
                if metrics_file:
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                if bar is not None:  # advanced here, where the steps are known to be done (dispatch runs ahead)
                    bar.update(done - bar.n)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rate:.0f}")
                if callback is not None:
                    callback(done, rec)
                if manager is not None and (done % config.ckpt_every == 0 or done == end):
                    _save(manager, done, state, config, history, steps_per_epoch)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    if out is not None and history:
        _plot_loss(history, out / "loss.png")
    return _result(graphdef, jax.tree.unflatten(treedef, leaves), config, history, out)


def _result(graphdef, state, config, history, out) -> TrainResult:
    host = jax.device_get(state)
    model = nnx.merge(graphdef, host["params"], host["rest"])
    ema_model = nnx.merge(graphdef, host["ema"], host["rest"])
    return TrainResult(model, ema_model, config, int(host["step"]), history, out)


def _checkpoint_tree(state) -> dict:
    """What a checkpoint stores of the training state: the NNX states as pure dicts, no `bad_step`."""
    tree = {k: state[k] for k in ("opt", "step")}
    return tree | {k: nnx.to_pure_dict(state[k]) for k in ("params", "rest", "ema")}


def _save(manager, step: int, state, config: TrainConfig, history: list[dict], steps_per_epoch: int) -> None:
    import orbax.checkpoint as ocp

    tree = _checkpoint_tree(state)
    position = dict(epoch=step // steps_per_epoch, batch_in_epoch=step % steps_per_epoch, steps_per_epoch=steps_per_epoch)
    meta = dict(config=config.to_json(), version=_library_version(), step=step, data_position=position, history=history)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def _restore(manager, step: int, state, config: TrainConfig, out: Path):
    import orbax.checkpoint as ocp

    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = TrainConfig.from_json(meta["config"])
    if saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(saved).items() if getattr(config, k) != v}
        raise ValueError(f"{out} holds a run with a different configuration (saved vs given: {diff}). "
                         "Use another `out_dir`, or pass `resume=False` to start over there.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_tree(state))
    got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    new = dict(state)
    for k in ("params", "rest", "ema"):
        s = state[k]
        nnx.replace_by_pure_dict(s, got[k])
        new[k] = s
    new["opt"], new["step"], new["bad_step"] = got["opt"], got["step"], jnp.int32(-1)
    return new, list(meta.get("history", []))


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel="loss (eq 96)", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run(out_dir: str | Path, *, step: int | None = None) -> TrainResult:
    """Load a run's checkpoint (the latest, or `step`) as a `TrainResult`, without training or data."""
    import orbax.checkpoint as ocp

    out = Path(out_dir)
    if not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints in {out}/checkpoints.")
    manager = _ckpt_manager(out, 1_000_000)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {out}/checkpoints.")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        config = TrainConfig.from_json(meta["config"])
        graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param, ...)
        opt = jax.eval_shape(_optimizer(config).init, params)
        target = dict(params=nnx.to_pure_dict(params), rest=nnx.to_pure_dict(rest), opt=opt, ema=nnx.to_pure_dict(params),
                      step=jax.ShapeDtypeStruct((), jnp.int32))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        manager.close()
    ema = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(params, got["params"])
    nnx.replace_by_pure_dict(rest, got["rest"])
    nnx.replace_by_pure_dict(ema, got["ema"])
    return TrainResult(nnx.merge(graphdef, params, rest), nnx.merge(graphdef, ema, rest), config, int(step),
                       list(meta.get("history", [])), out)
