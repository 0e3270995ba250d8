"""What verified checkpoints cost: `Checkpoints.save` / `.restore` (a SHA-256 per array, checked
on restore) against the same orbax `CheckpointManager` calls without digests.

The tree is a training run's checkpoint (parameters, AdamW state, EMA copy and step) for the
paper's U-Net (`TrainConfig.paper()`) by default, or `--model small` (the CLI's default run).
Both sides write and read the same tree through the same orbax items (a `StandardSave` array
tree and a JSON document), in one process, alternating, on the same disk; times are medians of
`--repeats`, a save timed until orbax has finished writing (`wait_until_finished`).

    python benchmarks/checkpoints.py [--model paper|small] [--repeats 7]
"""

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import coupled_diffusion as cd
from coupled_diffusion._checkpoint import Checkpoints, digests
from coupled_diffusion.diffusion.checkpoint import _abstract_state


def real_tree(config):
    """A checkpoint tree of the run's structure with random values (the values do not change the cost)."""
    _, _, abstract = _abstract_state(config)
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(0)
    arrays = [jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)) if jnp.issubdtype(x.dtype, jnp.floating)
              else jnp.zeros(x.shape, x.dtype) for x in leaves]
    return jax.tree.unflatten(treedef, arrays)


class PlainOrbax:
    """The baseline: the same orbax manager and items, no digests, no verification."""

    def __init__(self, directory):
        self.m = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def save(self, step, tree, doc):
        a = ocp.args
        self.m.save(step, args=a.Composite(state=a.StandardSave(tree), meta=a.JsonSave(doc)))
        self.m.wait_until_finished()

    def restore(self, step, like):
        a = ocp.args
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        got = self.m.restore(step, args=a.Composite(state=a.StandardRestore(abstract), meta=a.JsonRestore()))
        return got["state"], got["meta"]


class Ours:
    def __init__(self, directory):
        self.c = Checkpoints(directory, keep=2)

    def save(self, step, tree, doc):
        self.c.save(step, tree, doc)
        self.c._manager.wait_until_finished()

    def restore(self, step, like):
        return self.c.restore(step, like)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("paper", "small"), default="paper")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    cd.tune_cpu()
    config = cd.TrainConfig.paper() if args.model == "paper" else cd.TrainConfig()
    tree = real_tree(config)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    print(f"{args.model} run checkpoint: {len(jax.tree.leaves(tree))} arrays, {n_bytes / 2**20:.1f} MiB")
    doc = {"step": 0, "note": "benchmark"}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"plain orbax": PlainOrbax(pathlib.Path(tmp) / "plain"), "ours (verified)": Ours(pathlib.Path(tmp) / "ours")}
        times = {name: {"save": [], "restore": []} for name in sides}
        for r in range(args.repeats + 1):  # the first round warms up (imports, thread pools, page cache)
            for name, side in sides.items():
                t0 = time.perf_counter()
                side.save(r + 1, tree, doc)
                t1 = time.perf_counter()
                got, _ = side.restore(r + 1, tree)
                jax.block_until_ready(got)
                t2 = time.perf_counter()
                if r:
                    times[name]["save"].append(t1 - t0)
                    times[name]["restore"].append(t2 - t1)
        t_digest = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            digests(tree)
            t_digest.append(time.perf_counter() - t0)
        sides["ours (verified)"].c.close()
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    for n, d in med.items():
        print(f"{n:16s} save {d['save'] * 1e3:8.1f} ms   restore {d['restore'] * 1e3:8.1f} ms")
    dg = statistics.median(t_digest)
    print(f"SHA-256 of every array alone: {dg * 1e3:.1f} ms ({n_bytes / dg / 2**30:.2f} GiB/s)")
    for k in ("save", "restore"):
        print(f"{k}: ours / plain orbax = {med['ours (verified)'][k] / med['plain orbax'][k]:.2f}x time")


if __name__ == "__main__":
    main()
