"""Checkpoints that detect their own damage: digests of every array, fallback to the newest intact one."""

import json
import pathlib

import numpy as np
import pytest

from coupled_diffusion._checkpoint import Checkpoints, CorruptCheckpointError


def _tree(step):
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": rng.standard_normal(7), "n": np.array(step, np.int32)}


def _two_checkpoints(directory):
    with Checkpoints(directory, keep=3) as ckpts:
        for step in (1, 2):
            ckpts.save(step, _tree(step), {"note": f"step {step}"})


def _largest_array_file(directory: pathlib.Path, step: int) -> pathlib.Path:
    """The largest of the array data files (orbax's OCDBT `d/` folders) of checkpoint `step`, not a metadata file."""
    files = [p for p in (directory / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _rot(path: pathlib.Path, n: int = 256) -> None:
    """Overwrite `n` bytes in the middle of `path` (bit rot that keeps the file's size)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes((b ^ 0x5A) for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_intact_checkpoints_restore_verified(tmp_path):
    _two_checkpoints(tmp_path)
    with Checkpoints(tmp_path, keep=3) as ckpts:
        step, tree, doc = ckpts.restore_newest(_tree(0))
        assert step == 2 and doc["note"] == "step 2" and len(doc["array_sha256"]) == 3
        _same(tree, _tree(2))


def test_bit_rot_in_an_array_file_is_caught_and_the_previous_checkpoint_used(tmp_path):
    _two_checkpoints(tmp_path)
    _rot(_largest_array_file(tmp_path, 2))
    with Checkpoints(tmp_path, keep=3) as ckpts:
        with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*/2\b"):
            ckpts.restore(2, _tree(0))
        with pytest.warns(RuntimeWarning, match=r"(?s)checkpoint .*/2\b.*\(moved to 2\.damaged\); falling back to checkpoint 1"):
            step, tree, _ = ckpts.restore_newest(_tree(0), set_aside=True)
        assert step == 1
        _same(tree, _tree(1))
        assert ckpts.steps() == [1] and (tmp_path / "2.damaged").is_dir()
        ckpts.save(2, _tree(2), {"note": "again"})  # the step can be written anew
    with Checkpoints(tmp_path, keep=3) as ckpts:
        assert ckpts.restore_newest(_tree(0))[0] == 2


def test_a_changed_value_that_reads_back_silently_is_caught_by_its_digest(tmp_path):
    _two_checkpoints(tmp_path)
    # the storage layer reads this back without complaint: only the digest can tell
    meta = tmp_path / "2" / "meta" / "metadata"
    doc = json.loads(meta.read_text())
    doc["array_sha256"]["['w']"] = "0" * 64
    meta.write_text(json.dumps(doc))
    with Checkpoints(tmp_path, keep=3) as ckpts:
        with pytest.raises(CorruptCheckpointError, match=r"1 array\(s\) differ from what was saved \(SHA-256 mismatch\): \['w'\]"):
            ckpts.restore(2, _tree(0))


def test_an_unreadable_document_is_named_and_skipped(tmp_path):
    _two_checkpoints(tmp_path)
    meta = tmp_path / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:20])  # truncated JSON
    with Checkpoints(tmp_path, keep=3) as ckpts:
        with pytest.warns(RuntimeWarning, match=r"checkpoint .*/2 cannot be read .*; falling back to checkpoint 1"):
            assert ckpts.restore_newest(_tree(0))[0] == 1


def test_no_intact_checkpoint_stops_with_the_directory_named(tmp_path):
    _two_checkpoints(tmp_path)
    for step in (1, 2):
        _rot(_largest_array_file(tmp_path, step))
    with Checkpoints(tmp_path, keep=3) as ckpts:
        with pytest.raises(CorruptCheckpointError, match=r"(?s)no intact checkpoint in .*start afresh.*/2\b.*/1\b"):
            ckpts.restore_newest(_tree(0), set_aside=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["1", "2"]  # nothing renamed


def test_a_refused_document_is_not_mistaken_for_damage(tmp_path):
    _two_checkpoints(tmp_path)

    def refuse(doc):
        raise ValueError("another run")

    with Checkpoints(tmp_path, keep=3) as ckpts, pytest.raises(ValueError, match="another run"):
        ckpts.restore_newest(_tree(0), check_doc=refuse)
