"""Step-numbered checkpoints in one directory: an array tree and a JSON document per step, with orbax.

Used by every resumable job of the package (the training loop, schedule optimisation). Saves
are atomic (orbax writes a temporary directory and renames it) and the last `keep` are kept.
"""

from __future__ import annotations

import pathlib


class Checkpoints:
    """The checkpoints in `directory`: `save(step, tree, doc)`, `latest()`, `restore_doc(step)`,
    `restore_tree(step, like)`. Use it as a context manager (or call `close`), which waits for
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

    def save(self, step: int, tree, doc: dict) -> None:
        """Save the array `tree` and the JSON-serialisable `doc` as checkpoint `step`."""
        args = self._ocp.args
        self._manager.save(step, args=args.Composite(state=args.StandardSave(tree), **{self.doc_item: args.JsonSave(doc)}))

    def restore_doc(self, step: int) -> dict:
        """The JSON document of checkpoint `step`."""
        args = self._ocp.args
        return self._manager.restore(step, args=args.Composite(**{self.doc_item: args.JsonRestore()}))[self.doc_item]

    def restore_tree(self, step: int, like):
        """The array tree of checkpoint `step`, with the structure, shapes and dtypes of `like`
        (arrays or `jax.ShapeDtypeStruct`s)."""
        import jax

        args = self._ocp.args
        as_struct = self._ocp.utils.to_shape_dtype_struct
        abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else as_struct(x), like)
        return self._manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract)))["state"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
