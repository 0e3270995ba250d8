"""Step-numbered checkpoints in one directory: an array tree and a JSON document per step, with orbax.

Used by every resumable job of the package (the training loop, schedule optimisation). Saves
are atomic (orbax writes a temporary directory and renames it) and the last `keep` are kept.

Each save also stores a SHA-256 digest of every array (its dtype, shape and bytes) in the
document, and a restore recomputes and compares them: bit rot inside an array file, which
the storage layer reads back without complaint, is reported as a [`CorruptCheckpointError`][]
naming the checkpoint and the arrays, as is any failure to read a damaged folder.
[`Checkpoints.restore_newest`][] then falls back to the newest intact checkpoint with a
warning. Checkpoints written before the digests existed are restored unverified.
"""

from __future__ import annotations

import hashlib
import pathlib
import warnings

import numpy as np

DIGESTS = "array_sha256"  # the document key that holds the digests


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back as it was written (unreadable, or an array whose digest differs)."""


def digests(tree) -> dict[str, str]:
    """SHA-256 of each array leaf of `tree` (dtype, shape and bytes), keyed by its path in the tree."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def _is_abandoned_read(unraisable) -> bool:
    """The report of a TensorStore read that completes after orbax closed the event loop of a failed restore."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def _quiet_abandoned_reads() -> None:
    """Once a read of a damaged checkpoint has failed, the reads it left in flight report "Event loop is closed"
    through `sys.unraisablehook`, later and from TensorStore's threads: a raw traceback after the clear error.
    Chain a filter for exactly that report in front of the hook (installed once, before the first read,
    and again if the hook has been replaced since)."""
    import sys

    if getattr(sys.unraisablehook, "_coupled_diffusion", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook._coupled_diffusion = True
    sys.unraisablehook = hook


class Checkpoints:
    """The checkpoints in `directory`: `save(step, tree, doc)`, `latest()`, `restore_doc(step)`,
    `restore_tree(step, like)`, `restore(step, like)` (verified) and `restore_newest(like)`
    (verified, with fallback). Use it as a context manager (or call `close`), which waits for
    pending asynchronous saves.

    **Arguments:**

    - `directory`: where the step folders go (created if missing).
    - `keep`: how many of the latest checkpoints to keep.
    - `doc_item`: the name of the JSON item in each checkpoint (the array tree is `"state"`).
    """

    def __init__(self, directory, *, keep: int, doc_item: str = "meta"):
        import orbax.checkpoint as ocp

        self.directory = pathlib.Path(directory).absolute()
        self.doc_item = doc_item
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest(self) -> int | None:
        """The latest saved step, or `None`."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every saved step, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, tree, doc: dict) -> None:
        """Save the array `tree` and the JSON-serialisable `doc` (with the arrays' digests added) as checkpoint `step`."""
        args = self._ocp.args
        doc = {**doc, DIGESTS: digests(tree)}
        self._manager.save(step, args=args.Composite(state=args.StandardSave(tree), **{self.doc_item: args.JsonSave(doc)}))

    def restore_doc(self, step: int) -> dict:
        """The JSON document of checkpoint `step` (unverified)."""
        args = self._ocp.args
        return self._manager.restore(step, args=args.Composite(**{self.doc_item: args.JsonRestore()}))[self.doc_item]

    def restore_tree(self, step: int, like):
        """The array tree of checkpoint `step`, with the structure, shapes and dtypes of `like`
        (arrays or `jax.ShapeDtypeStruct`s); unverified."""
        import jax

        args = self._ocp.args
        as_struct = self._ocp.utils.to_shape_dtype_struct
        abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else as_struct(x), like)
        return self._manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract)))["state"]

    def _readable(self, step: int, read):
        # the filter goes in before the read: orbax closes its loop before the failure reaches us, and an
        # abandoned read can report in between (seen once in a test run when it went in after the failure)
        _quiet_abandoned_reads()
        try:
            return read()
        except Exception as e:  # a damaged folder raises whatever orbax, TensorStore or json meet first
            raise CorruptCheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                                         f"({type(e).__name__}: {str(e)[:300]})") from e

    def read_doc(self, step: int) -> dict:
        """The JSON document of checkpoint `step`; a damaged one raises [`CorruptCheckpointError`][]."""
        return self._readable(step, lambda: self.restore_doc(step))

    def restore(self, step: int, like, doc: dict | None = None):
        """`(tree, doc)` of checkpoint `step`, each array checked against the digest saved with it.

        Raises [`CorruptCheckpointError`][], naming the checkpoint and the arrays, when it cannot be
        read or an array differs from what was saved. `doc`: the document, if already read.
        """
        doc = self.read_doc(step) if doc is None else doc
        tree = self._readable(step, lambda: self.restore_tree(step, like))
        saved = doc.get(DIGESTS)
        if saved is not None:
            got = digests(tree)
            bad = sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))
            if bad:
                raise CorruptCheckpointError(f"checkpoint {self.directory / str(step)}: {len(bad)} array(s) differ from what was "
                                             f"saved (SHA-256 mismatch): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        return tree, doc

    def restore_newest(self, like, *, check_doc=None, set_aside: bool = False):
        """`(step, tree, doc)` of the newest intact checkpoint, or `None` if there is none at all.

        `like` is as for [`restore_tree`][], or a function of the checkpoint's document that gives it.
        A damaged checkpoint is skipped with a warning that names it. With `set_aside=True` (a
        run that will write here again) the damaged folders newer than the one restored are
        renamed `<step>.damaged`, so that those steps can be saved anew and the evidence is kept;
        nothing is renamed unless an older checkpoint restored with the same `like`, which rules
        out a fault of the caller's. `check_doc(doc)` may raise to refuse a readable checkpoint
        (e.g. another run's configuration); that error is not caught. If no checkpoint is
        intact, raises [`CorruptCheckpointError`][] naming the directory and every failure.
        """
        steps, damaged = self.steps(), []
        for step in steps:
            try:
                doc = self.read_doc(step)
                if check_doc is not None:
                    check_doc(doc)
                tree, doc = self.restore(step, like(doc) if callable(like) else like, doc)
            except CorruptCheckpointError as e:
                damaged.append((step, e))
                continue
            for bad, error in damaged:
                moved = f" (moved to {self._set_aside(bad).name})" if set_aside else ""
                warnings.warn(f"{error}{moved}; falling back to checkpoint {step}.", RuntimeWarning, stacklevel=2)
            if set_aside and damaged:
                self._manager.reload()
            return step, tree, doc
        if damaged:
            reasons = "\n".join(f"  {error}" for _, error in damaged)
            raise CorruptCheckpointError(f"no intact checkpoint in {self.directory}; move or delete the folder to start afresh "
                                         f"(or `resume=False`, `--no-resume`):\n{reasons}")
        return None

    def _set_aside(self, step: int) -> pathlib.Path:
        target, n = self.directory / f"{step}.damaged", 1
        while target.exists():
            target, n = self.directory / f"{step}.damaged{n}", n + 1
        (self.directory / str(step)).rename(target)
        return target

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
