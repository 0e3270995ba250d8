"""Runs that survive their own faults (issue 22): one writer per run directory, fallback past
damaged checkpoints of every kind, data faults named by index, and one-line CLI errors.

Each test does the fault to a tiny run (or to the store under it) and checks both what the
user is told and that nothing was lost or mixed.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoints import _largest_array_file, _rot, _same, _tree, _two_checkpoints
from test_train import TINY, _data, _leaves

import coupled_diffusion as cd
from coupled_diffusion import _runlock
from coupled_diffusion._checkpoint import Checkpoints, CorruptCheckpointError
from coupled_diffusion._runlock import RunLock, RunLockedError
from coupled_diffusion.cli import main
from coupled_diffusion.diffusion.train import load_run, train

# ------------------------------------------------------------------------------------ one writer per directory

HOLD = """
import sys, time
from coupled_diffusion._runlock import RunLock
lock = RunLock(sys.argv[1], "test holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(directory):
    """A process that takes the lock on `directory` and sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.stdout.close()
    return proc


def test_a_second_writer_is_refused_naming_the_directory_and_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by another test holder \(pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
        # the training loop and schedule optimisation take it before any work (no data, no compile)
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            train(TINY, tmp_path, data=_data(), progress=False)
        obj = lambda s, k: jnp.sum(s.values**2)  # noqa: E731
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            cd.optimize_schedule(obj, cd.PiecewiseLinear([0.0, 1.0], [0.1, 0.2]), steps=2, checkpoint_dir=tmp_path, progress=False)
        assert time.perf_counter() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL leaves the lock file behind, with the dead holder's pid: it does not block the next writer
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_two_locks_in_one_process_exclude_each_other_and_release(tmp_path):
    with RunLock(tmp_path, "first"):
        with pytest.raises(RunLockedError, match=r"in use by another first"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released: free again


def test_without_flock_the_lock_file_is_the_lock_and_a_dead_holder_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(_runlock, "fcntl", None)  # as on Windows
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = dict(what="training run", pid=dead.pid, host=_runlock.socket.gethostname(), started=time.time(), argv=["x"])
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock .* pid {dead.pid} .*no longer running"):
        lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):  # now held by a live process: this one
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    other_host = dict(stale, host="elsewhere")  # a pid on another host cannot be checked: refused, not taken
    (tmp_path / ".lock").write_text(json.dumps(other_host))
    with pytest.raises(RunLockedError, match="on elsewhere"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------ damaged checkpoints


def _halve_arrays(step_dir: pathlib.Path) -> None:
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # what was seen to block a resume with a raw third-party exception, and more
    "truncated-document": lambda d: _truncate(d / "meta" / "metadata"),  # JSONDecodeError
    "truncated-state-metadata": lambda d: _truncate(d / "state" / "_METADATA"),  # JSONDecodeError
    "deleted-state": lambda d: shutil.rmtree(d / "state"),  # KeyError
    "deleted-document": lambda d: shutil.rmtree(d / "meta"),
    "halved-array-files": _halve_arrays,  # TensorStore OUT_OF_RANGE, then "Event loop is closed"
    "bit-rot-in-an-array": lambda d: _rot(_largest_array_file(d.parent, int(d.name))),  # reads back silently
    "emptied-folder": lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_falls_back_to_the_newest_intact_checkpoint(damage, tmp_path):
    _two_checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / "2")
    reports = []
    hook, sys.unraisablehook = sys.unraisablehook, reports.append  # what the storage layer's threads report
    try:
        with Checkpoints(tmp_path, keep=3) as ckpts:
            with pytest.warns(RuntimeWarning, match=r"checkpoint .*/2\b.*moved to 2\.damaged.*falling back to checkpoint 1"):
                step, tree, _ = ckpts.restore_newest(_tree(0), set_aside=True)
        time.sleep(0.2)  # late reports of abandoned reads would arrive here
    finally:
        sys.unraisablehook = hook
    assert step == 1
    _same(tree, _tree(1))
    assert (tmp_path / "2.damaged").is_dir()
    assert not [r for r in reports if "Event loop is closed" in str(r.exc_value)]


def test_no_intact_checkpoint_says_how_to_start_afresh(tmp_path):
    _two_checkpoints(tmp_path)
    DAMAGE["truncated-state-metadata"](tmp_path / "1")
    DAMAGE["halved-array-files"](tmp_path / "2")
    with Checkpoints(tmp_path, keep=3) as ckpts, pytest.raises(
            CorruptCheckpointError, match=r"(?s)no intact checkpoint in .*move or delete the folder.*--no-resume.*/2\b.*/1\b"):
        ckpts.restore_newest(_tree(0), set_aside=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-step tiny run (checkpoints 4 and 6 kept)."""
    out = tmp_path_factory.mktemp("run") / "a"
    return out, train(TINY, out, data=_data(), progress=False)


@pytest.mark.parametrize("damage", ["truncated-document", "truncated-state-metadata", "deleted-state", "halved-array-files"])
def test_a_run_whose_latest_checkpoint_is_damaged_loads_the_one_before(damage, finished_run, tmp_path):
    out, _ = finished_run
    shutil.copytree(out, tmp_path / "r")
    DAMAGE[damage](tmp_path / "r" / "checkpoints" / "6")
    with pytest.warns(RuntimeWarning, match=r"checkpoints/6\b.*falling back to checkpoint 4"):
        back = load_run(tmp_path / "r")
    assert back.step == 4


def test_resuming_past_a_damaged_checkpoint_retrains_to_the_same_weights(finished_run, tmp_path):
    out, full = finished_run
    shutil.copytree(out, tmp_path / "r")
    DAMAGE["halved-array-files"](tmp_path / "r" / "checkpoints" / "6")
    with pytest.warns(RuntimeWarning, match=r"checkpoints/6\b.*moved to 6\.damaged.*checkpoint 4"):
        again = train(TINY, tmp_path / "r", data=_data(), progress=False)
    assert again.step == 6
    for a, b in zip(_leaves(full.model) + _leaves(full.ema_model), _leaves(again.model) + _leaves(again.ema_model), strict=True):
        np.testing.assert_array_equal(a, b)
    logged = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------ data faults


def test_non_finite_data_are_named_by_index_before_any_training(tmp_path):
    with pytest.raises(ValueError, match=r"`images` hold non-finite pixels in 1 of 40 images, the first at index 7"):
        _data(nan_at=7)
    data = _data()
    bad = eqx.tree_at(lambda d: d.x, data, data.x.at[13, 5, 5].set(jnp.nan))  # data made some other way
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"non-finite images: 1 of 40, the first at data index 13.*--allow-data-change"):
        train(TINY, tmp_path / "r", data=bad, progress=False)
    assert time.perf_counter() - t0 < 5  # before building the model or compiling the step


def test_a_diverging_run_reports_the_step_as_the_logs_count_it(tmp_path):
    cfg = TINY.replace(lr=1e30, grad_clip=1e30, warmup_steps=1, ckpt_every=1)  # Adam's first update is +-lr per weight
    logged = []
    with pytest.raises(FloatingPointError) as stop:
        train(cfg, tmp_path / "r", data=_data(), progress=False, callback=lambda step, rec: logged.append(step))
    bad = int(str(stop.value).split("at step ")[1].split()[0])
    assert logged and bad == logged[-1] + 1  # the first step not logged: 1-based, as the records and checkpoints
    assert "although the data are finite" in str(stop.value)
    good = load_run(tmp_path / "r")
    assert good.step == logged[-1] and all(np.all(np.isfinite(x)) for x in _leaves(good.model))


def _npz(path, shift=0.0):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 28, 28)).astype(np.float32)
    np.savez(path, x_train=np.clip(x + shift, 0, 1), y_train=np.arange(40) % 4)
    return str(path)


@pytest.mark.slow  # ~40 s: two more compilations of the step with data read from files
def test_a_run_resumes_with_a_repaired_data_file_only_when_allowed(tmp_path):
    first, repaired = _npz(tmp_path / "a.npz"), _npz(tmp_path / "b.npz", shift=0.01)
    cfg = TINY.replace(data_path=first, transform="dilate")
    train(cfg, tmp_path / "r", progress=False, stop_at=4)
    moved = cfg.replace(data_path=repaired)
    with pytest.raises(ValueError, match=r"different configuration .*'data_path'.*--allow-data-change"):
        train(moved, tmp_path / "r", progress=False)
    with pytest.warns(UserWarning, match=r"resuming .* at step 4 with data_path .*b\.npz.* instead of .*a\.npz"):
        done = train(moved, tmp_path / "r", progress=False, allow_data_change=True)
    assert done.step == 6
    meta = json.loads((tmp_path / "r" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert [(c["step"], c["old"], c["new"]) for c in meta["data_changes"]] == [(4, first, repaired)]


# ------------------------------------------------------------------------------------ the command line

CLI_CASES = [  # (argv, what the one line must say); each used to print a traceback, some after 17-33 s of compiling
    (["train", "--out", "{file}"], r"coupled-diffusion: error: --out .*is an existing file, not a directory"),
    (["train", "--channels", "16,abc"], r"argument --channels: expected comma-separated positive integer widths"),
    (["train", "--n-train", "0"], r"argument --n-train: expected an integer >= 1, got '0'"),
    (["train", "--seed", "-1"], r"argument --seed: expected an integer >= 0, got '-1'"),
    (["conditional", "--n-steps", "0"], r"argument --n-steps: expected an integer >= 1, got '0'"),
    (["optimize-schedule", "--steps", "0"], r"argument --steps: expected an integer >= 1, got '0'"),
    (["train", "--g", "1.5"], r"coupled-diffusion: error: `g` must be a finite number with \|g\| < 1"),
    (["train", "--data", "{missing}"], r"coupled-diffusion: error: --data .*missing\.npz: no such file or folder"),
    (["train", "--lr", "0"], r"argument --lr: expected a finite number > 0, got '0'"),
]


@pytest.mark.parametrize(("argv", "match"), CLI_CASES, ids=[" ".join(a[:3]) for a, _ in CLI_CASES])
def test_cli_errors_are_one_line_with_exit_status_2_before_any_work(argv, match, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    argv = [a.format(file=tmp_path / "file", missing=tmp_path / "missing.npz") for a in argv]
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert time.perf_counter() - t0 < 5


def test_cli_debug_shows_the_traceback_instead(tmp_path):
    (tmp_path / "file").write_text("x")
    from coupled_diffusion.cli import UsageError

    with pytest.raises(UsageError, match="existing file"):
        main(["train", "--out", str(tmp_path / "file"), "--debug"])


def test_cli_train_into_a_locked_run_directory_is_one_line(tmp_path, capsys):
    proc = _holder(tmp_path / "run")
    try:
        code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    err = capsys.readouterr().err
    assert code == 2 and f"coupled-diffusion: error: {tmp_path / 'run'} is in use by another test holder (pid {proc.pid}" in err
    assert "Traceback" not in err


def test_jit_errors_carry_the_librarys_message():
    # README ("Errors inside jit"): the message arrives wrapped, but it arrives; throw=False gives codes instead
    import jax

    data = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.0)
    solve = lambda g, throw: cd.speciation_time(cd.CoupledOU.symmetric(1.0, g, 2.0), data, throw=throw)  # noqa: E731
    with pytest.raises(Exception, match=r"(?s)Unstable forward process"):  # g = 1.5 > beta, traced: no eager check
        jax.block_until_ready(jax.jit(lambda g: solve(g, True).value)(1.5))
    codes = jax.jit(jax.vmap(lambda g: solve(g, False).result))(jnp.array([0.3, 1.5]))
    assert np.asarray(codes == cd.RESULTS.successful).tolist() == [True, False]
    assert np.asarray(codes == cd.RESULTS.unstable).tolist() == [False, True]


def test_collapse_time_names_a_non_finite_alpha():
    ou, data = cd.CoupledOU.symmetric(1.0, 0.3, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"`alpha` must be finite"):  # was: "Invalid parameters: a value is non-finite, ..."
        cd.collapse_time(ou, data, alpha=float("nan"))
