"""A training run on disk: its checkpoints, and the `TrainResult` a run (or a checkpoint) gives.

A checkpoint (`<out_dir>/checkpoints/<step>`, orbax, atomic) holds the parameters, the EMA,
the optimiser state and the step (which fixes the RNG state and the data position: epoch and
offset) as arrays, and as JSON the configuration (`TrainConfig.to_json`), the library
version, the data position and the logged history.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from .._checkpoint import Checkpoints
from .._version import __version__
from ..models.unet import UNet
from .build import build_model, build_optimizer
from .config import TrainConfig


@dataclasses.dataclass
class TrainResult:
    """What `train` and `load_run` return: the model with the EMA weights (for sampling), the raw model,
    the configuration, the step reached, the logged history and the run directory (`None` if none)."""

    model: UNet
    ema_model: UNet
    config: TrainConfig
    step: int
    history: list[dict]
    out_dir: Path | None


def result_from_state(graphdef, state, config: TrainConfig, history: list[dict], out: Path | None) -> TrainResult:
    """The [`TrainResult`][] of a training state (copied to the host)."""
    host = jax.device_get(state)
    model = nnx.merge(graphdef, host["params"], host["rest"])
    ema_model = nnx.merge(graphdef, host["ema"], host["rest"])
    return TrainResult(model, ema_model, config, int(host["step"]), history, out)


def run_checkpoints(out_dir: Path, keep: int) -> Checkpoints:
    """The [`Checkpoints`][] of a run directory (`<out_dir>/checkpoints`)."""
    return Checkpoints(Path(out_dir).resolve() / "checkpoints", keep=keep)


def _stored(state) -> dict:
    """What a checkpoint stores of the training state: the NNX states as pure dicts, no `bad_step`."""
    tree = {k: state[k] for k in ("opt", "step")}
    return tree | {k: nnx.to_pure_dict(state[k]) for k in ("params", "rest", "ema")}


def save_checkpoint(ckpts: Checkpoints, step: int, state, config: TrainConfig, history: list[dict], steps_per_epoch: int,
                    data_changes: list[dict] = ()) -> None:
    """Save the training `state` at `step` with the configuration, the library version, the data position, the history
    and the data files the run switched between (`data_changes`, see [`train`][]'s `allow_data_change`)."""
    position = dict(epoch=step // steps_per_epoch, batch_in_epoch=step % steps_per_epoch, steps_per_epoch=steps_per_epoch)
    meta = dict(config=config.to_json(), version=__version__, step=step, data_position=position, history=history,
                data_changes=list(data_changes))
    ckpts.save(step, _stored(state), meta)


def _config_diff(saved: TrainConfig, given: TrainConfig) -> dict:
    g = given.to_json()
    return {k: (v, g[k]) for k, v in saved.to_json().items() if g[k] != v}


def restore_checkpoint(ckpts: Checkpoints, state, config: TrainConfig, out: Path, *, allow_data_change: bool = False,
                       steps_per_epoch: int | None = None):
    """`(step, state, history, data_changes)` of the newest intact checkpoint, into the structure of `state`; `None` if
    there is none.

    Each array is checked against the digest saved with it; a damaged checkpoint is set aside
    (renamed `<step>.damaged`) with a warning and the one before it is used. Raises when a
    checkpoint was written with another configuration, naming the fields that differ; with
    `allow_data_change`, a different `data_path` alone is accepted and appended to `data_changes`,
    provided the new data give the same `steps_per_epoch` (the data order continues as it was).
    """

    def same_config(meta: dict) -> None:
        diff = _config_diff(TrainConfig.from_json(meta["config"]), config)
        if allow_data_change:
            diff.pop("data_path", None)
        if diff:
            hint = " (a changed `data_path` alone is accepted with `allow_data_change=True`, `--allow-data-change`)" \
                if "data_path" in diff else ""
            raise ValueError(f"{out} holds a run with a different configuration (saved vs given: {diff}). "
                             f"Use another `out_dir`, or pass `resume=False` (`--no-resume`) to start over there{hint}.")

    found = ckpts.restore_newest(_stored(state), check_doc=same_config, set_aside=True)
    if found is None:
        return None
    step, got, meta = found
    changes = list(meta.get("data_changes", []))
    old_path = TrainConfig.from_json(meta["config"]).data.data_path
    if old_path != config.data.data_path:
        saved_spe = meta.get("data_position", {}).get("steps_per_epoch")
        if steps_per_epoch is not None and saved_spe is not None and saved_spe != steps_per_epoch:
            raise ValueError(f"{out}: the data at {config.data.data_path!r} give {steps_per_epoch} steps per epoch, the run's "
                             f"{saved_spe}; a changed `data_path` must hold a data set of the same size to resume.")
        changes.append(dict(step=step, old=old_path, new=config.data.data_path, time=time.time()))
        warnings.warn(f"resuming {out} at step {step} with data_path {config.data.data_path!r} instead of {old_path!r} "
                      "(allow_data_change; recorded in the checkpoints' data_changes).", UserWarning, stacklevel=3)
    new = dict(state)
    for k in ("params", "rest", "ema"):
        s = state[k]
        nnx.replace_by_pure_dict(s, got[k])
        new[k] = s
    new["opt"], new["step"], new["bad_step"] = got["opt"], got["step"], jnp.int32(-1)
    return step, new, list(meta.get("history", [])), changes


def _abstract_state(config: TrainConfig):
    """The graph of the run's model and the structure, shapes and dtypes of what its checkpoints store
    (host arrays: no shardings), built without allocating a parameter."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(config.model, config.seed)), nnx.Param, ...)
    opt = jax.eval_shape(build_optimizer(config.optimizer, config.steps).init, params)
    pure = dict(params=nnx.to_pure_dict(params), rest=nnx.to_pure_dict(rest), opt=opt, ema=nnx.to_pure_dict(params),
                step=jax.ShapeDtypeStruct((), jnp.int32))
    return graphdef, (params, rest), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)


def load_run(out_dir: str | Path, *, step: int | None = None) -> TrainResult:
    """Load a run's checkpoint (the newest intact one, or `step`) as a `TrainResult`, without training or data."""
    out = Path(out_dir)
    if not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints in {out}/checkpoints.")
    built = {}

    def like(meta):  # the stored structure of the run a checkpoint's document describes
        built["config"] = TrainConfig.from_json(meta["config"])
        built["graphdef"], built["model"], stored = _abstract_state(built["config"])
        return stored

    with run_checkpoints(out, 1_000_000) as ckpts:
        if step is None:  # the newest intact checkpoint
            found = ckpts.restore_newest(like)
            if found is None:
                raise FileNotFoundError(f"no checkpoints in {out}/checkpoints.")
            step, got, meta = found
        else:
            meta = ckpts.read_doc(step)
            got, meta = ckpts.restore(step, like(meta), meta)
    config, graphdef, (params, rest) = built["config"], built["graphdef"], built["model"]
    ema = jax.tree.map(lambda x: x, params)
    for target, key in ((params, "params"), (rest, "rest"), (ema, "ema")):
        nnx.replace_by_pure_dict(target, got[key])
    return TrainResult(nnx.merge(graphdef, params, rest), nnx.merge(graphdef, ema, rest), config, int(step),
                       list(meta.get("history", [])), out)
