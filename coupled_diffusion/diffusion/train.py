r"""The training loop: run (or resume) a [`TrainConfig`][] and return its [`TrainResult`][].

The step ([`compiled_step`][], Section 5, eq 94-96) is a plain `jax.jit` over the flat leaves
of the split NNX state, with the batch split over all devices (data parallel; parameters
replicated); each epoch's order goes to the device once. Everything random is a function of
`(seed, step)` and the data order of `(seed, epoch)`, so a run resumed from a checkpoint
continues *exactly* as if it had not stopped (tested bit for bit).

Checkpoints ([`save_checkpoint`][]: orbax, atomic, the last `keep`) hold the parameters, the
EMA, the optimizer state, the step (which fixes the RNG state and the data position), the
configuration and the library version. A non-finite loss or gradient leaves the parameters
untouched on the device, and the run stops with `FloatingPointError` at the next log point,
keeping the last good checkpoint. Progress goes to a tqdm bar (loss, images/s), to
`metrics.jsonl` and to `loss.png`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .._runlock import RunLock
from ..data.pairing import PairedMNIST
from ..models.sharding import data_mesh
from .build import build_data, build_model, build_optimizer, learning_rate
from .checkpoint import TrainResult, load_run, restore_checkpoint, result_from_state, run_checkpoints, save_checkpoint
from .config import TrainConfig
from .step import compiled_step, initial_state

__all__ = ["TrainConfig", "TrainResult", "load_run", "train"]


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop the records of `metrics.jsonl` past `last_step` (a run killed between checkpoints)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x and json.loads(x)["step"] <= last_step]
        path.write_text("".join(x + "\n" for x in lines))


def _check_finite_data(data: PairedMNIST) -> None:
    """Non-finite pixels in the pairs would surface as a non-finite loss many steps later, blamed on the optimiser."""
    for name, arr in (("images", data.x), ("transformed images", data.tx)):
        bad = ~np.isfinite(np.asarray(arr)).reshape(len(arr), -1).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)
            raise ValueError(f"the training data hold non-finite {name}: {len(idx)} of {len(arr)}, the first at data index "
                             f"{int(idx[0])}{' (' + ', '.join(map(str, idx[1:5])) + ' ...)' if len(idx) > 1 else ''}. "
                             "Repair or drop them; a run that stopped on them can resume with the repaired file "
                             "(`allow_data_change=True`, `--allow-data-change`).")


class _EpochIndices:
    """Each epoch's pair order on the device, once per epoch, as `(steps_per_epoch, B)` arrays split over the batch axis."""

    def __init__(self, data: PairedMNIST, seed: int, batch_size: int, steps_per_epoch: int, sharding):
        self.data, self.seed, self.B, self.steps_per_epoch, self.sharding = data, seed, batch_size, steps_per_epoch, sharding
        self._epoch, self._arrays = None, None

    def __call__(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            a, b = self.data.epoch_indices(self.seed, epoch)
            n = self.steps_per_epoch * self.B
            shape = (self.steps_per_epoch, self.B)
            self._epoch = epoch
            self._arrays = (jax.device_put(a[:n].reshape(shape), self.sharding), jax.device_put(b[:n].reshape(shape), self.sharding))
        return (*self._arrays, np.int32(i))


def train(config: TrainConfig = TrainConfig(), out_dir: str | Path | None = None, *, data: PairedMNIST | None = None,
          resume: bool = True, progress: bool = True, mesh=None, stop_at: int | None = None,
          callback: Callable[[int, dict], Any] | None = None, allow_data_change: bool = False) -> TrainResult:
    """Train (or resume) a run; see the module docstring.

    **Arguments:**

    - `config`: the [`TrainConfig`][].
    - `out_dir`: where checkpoints, `config.json`, `metrics.jsonl` and `loss.png` go (`None`:
        nothing is written and nothing resumed).
    - `data`: a `PairedMNIST` to use instead of building one from `config.data` (tests, custom data).
    - `resume`: continue from the latest checkpoint in `out_dir` if there is one (its
        configuration must equal `config`).
    - `progress`: show a tqdm progress bar.
    - `mesh`: a 1-D device mesh for data parallelism (default: all devices).
    - `stop_at`: stop (after checkpointing) when this step is reached, before `config.steps`;
        what a killed run looks like, for tests.
    - `callback`: called as `callback(step, record)` at every log point.
    - `allow_data_change`: resume even though `config.data.data_path` differs from the run's
        (e.g. a repaired data file; every other field must still match). The change is
        recorded in the checkpoints' `data_changes` (step, old and new path).

    While it runs, the run holds an exclusive lock on `out_dir` ([`RunLock`][]): a second
    writer stops at once with `RunLockedError` naming the holder.

    **Returns:** the [`TrainResult`][].
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise FileExistsError(f"`out_dir` {out} is an existing file, not a directory.")
    lock = RunLock(out, "training run").acquire() if out is not None else None  # one writer per run directory
    try:
        return _train(config, out, data, resume, progress, mesh, stop_at, callback, allow_data_change)
    finally:
        if lock is not None:
            lock.release()


def _train(config, out, data, resume, progress, mesh, stop_at, callback, allow_data_change):
    data = build_data(config.data) if data is None else data
    _check_finite_data(data)
    B = config.batch_size
    steps_per_epoch = len(data) // B
    if steps_per_epoch == 0:
        raise ValueError(f"`batch_size` ({B}) is larger than the data set ({len(data)} pairs).")
    mesh = data_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if B % n_dev:
        raise ValueError(f"`batch_size` ({B}) must be a multiple of the number of devices ({n_dev}).")
    graphdef, state = initial_state(build_model(config.model, config.seed), build_optimizer(config.optimizer, config.steps))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state, replicated)
    data = jax.device_put(data, replicated)

    ckpts = None
    history: list[dict] = []
    data_changes: list[dict] = []
    if out is not None:
        ckpts = run_checkpoints(out, config.keep)
        found = restore_checkpoint(ckpts, state, config, out, allow_data_change=allow_data_change,
                                   steps_per_epoch=steps_per_epoch) if resume else None
        resumed_at = 0
        if found is not None:
            resumed_at, state, history, data_changes = found
        _trim_metrics(out / "metrics.jsonl", resumed_at)
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=1))
    leaves, treedef = jax.tree.flatten(state)
    step_fn = compiled_step(graphdef, treedef, config.noise, config.model, config.optimizer, config.run)
    indices = _EpochIndices(data, config.seed, B, steps_per_epoch, NamedSharding(mesh, PartitionSpec(None, mesh.axis_names[0])))
    lr = learning_rate(config.optimizer, config.steps)

    start = int(state["step"])
    end = config.steps if stop_at is None else min(stop_at, config.steps)
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
            checkpoint_now = ckpts is not None and (done % config.ckpt_every == 0 or done == end)
            if not (done % config.log_every == 0 or done == end or checkpoint_now):
                continue
            state = jax.tree.unflatten(treedef, leaves)
            bad = int(state["bad_step"])
            losses = np.array([float(p["loss"]) for p in pending])
            gn = float(pending[-1]["grad_norm"])
            pending.clear()
            if bad >= 0:
                kept = ckpts.latest() if ckpts is not None else None
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {bad + 1} (counted from 1, as in the logs and checkpoints; "
                    f"learning rate {float(lr(bad + 1)):.3g}) although the data are finite (checked at the start); the "
                    f"parameters were not updated from that step on"
                    + (f", and the last good checkpoint (step {kept}) is kept in {out}/checkpoints." if kept is not None else ".")
                    + " Lower `lr`, raise `warmup_steps` or tighten `grad_clip`.")
            now = time.perf_counter()
            rate = (done - n_last) * B / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            rec = dict(step=done, epoch=done / steps_per_epoch, loss=float(losses.mean()), grad_norm=gn,
                       lr=float(lr(done)), img_per_s=rate, time=time.time())
            history.append(rec)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if bar is not None:  # advanced here, where the steps are known to be done (dispatch runs ahead)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rate:.0f}")
            if callback is not None:
                callback(done, rec)
            if checkpoint_now:
                save_checkpoint(ckpts, done, state, config, history, steps_per_epoch, data_changes)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
        if ckpts is not None:
            ckpts.close()
    if out is not None and history:
        from ..plotting import plot_loss, save_figure

        save_figure(plot_loss(history), out / "loss.png", dpi=100)
    return result_from_state(graphdef, jax.tree.unflatten(treedef, leaves), config, history, out)
