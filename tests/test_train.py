"""The training loop: exact resume after an interruption, non-finite stops, checkpoints, the CLI."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import coupled_diffusion as cd
from coupled_diffusion.diffusion.train import TrainConfig, load_run, train


def _data(n=40, nan_at=None):  # nan_at: a NaN image, refused by PairedMNIST (tests/test_faults.py)
    rng = np.random.default_rng(0)
    x = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        r, c = rng.integers(4, 14, 2)
        x[i, r:r + 10, c:c + 10] = rng.uniform(0.3, 1.0)
    if nan_at is not None:
        x[nan_at] = np.nan
    return cd.PairedMNIST(x, np.arange(n) % 4, transform="dilate")


TINY = TrainConfig(block_channels=(8, 16), attention=(False, True), num_groups=4, attention_head_dim=8, T=20,
                   batch_size=8, steps=6, lr=3e-3, warmup_steps=2, log_every=1, ckpt_every=2, keep=2, g=0.4)


def _leaves(model):
    from flax import nnx

    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_interrupted_run_resumes_exactly(tmp_path):
    data = _data()
    full = train(TINY, tmp_path / "a", data=data, progress=False)
    assert full.step == 6 and [h["step"] for h in full.history] == [1, 2, 3, 4, 5, 6]

    class Killed(Exception):
        pass

    def kill_at_5(step, _):
        if step == 5:  # dies after the step-4 checkpoint, mid-way to the next one
            raise Killed

    with pytest.raises(Killed):
        train(TINY, tmp_path / "b", data=data, progress=False, callback=kill_at_5)
    resumed = train(TINY, tmp_path / "b", data=data, progress=False)  # picks up the step-4 checkpoint
    # (resuming past a damaged latest checkpoint, to the same weights: tests/test_faults.py)
    assert resumed.step == 6
    for a, b in zip(_leaves(full.model), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(full.ema_model), _leaves(resumed.ema_model), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal([h["loss"] for h in full.history], [h["loss"] for h in resumed.history])
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # the step-5 record of the killed run was dropped on resume
    # the EMA is not the raw model, and training moved the loss
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(full.model), _leaves(full.ema_model)))
    # files: keep the last 2 checkpoints, metrics, loss curve, config; the checkpoint loads back
    steps = sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and all(r["img_per_s"] > 0 for r in lines)
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    back = load_run(tmp_path / "a")
    assert back.config == TINY and back.step == 6
    for a, b in zip(_leaves(full.ema_model), _leaves(back.ema_model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~80 s on 2 cores; the kill-and-resume test covers exact resume by default
def test_stop_at_then_resume_equals_uninterrupted_and_config_is_checked(tmp_path):
    data = _data()
    cfg = TINY.__class__(**{**TINY.to_json(), "ckpt_every": 1})
    full = train(cfg, tmp_path / "a", data=data, progress=False)
    part = train(cfg, tmp_path / "b", data=data, progress=False, stop_at=3)  # a clean stop after step 3
    assert part.step == 3
    rest = train(cfg, tmp_path / "b", data=data, progress=False)
    for a, b in zip(_leaves(full.model), _leaves(rest.model), strict=True):
        np.testing.assert_array_equal(a, b)
    other = cfg.__class__(**{**cfg.to_json(), "g": 0.1})
    with pytest.raises(ValueError, match="different configuration.*'g'"):
        train(other, tmp_path / "b", data=data, progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="`g`"):
        train(TINY.__class__(**{**TINY.to_json(), "g": 1.0}), data=_data(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(TINY.__class__(**{**TINY.to_json(), "batch_size": 64}), data=_data(), progress=False)
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(block_channels=(8, 16)).validate()


def test_train_command_writes_a_run_and_samples(tmp_path, monkeypatch, capsys):
    from coupled_diffusion.cli import main

    monkeypatch.setenv("COUPLED_DIFFUSION_CPU_TUNING", "0")  # the command opts in to the tuning; keep this worker untouched

    rng = np.random.default_rng(0)
    x = np.zeros((48, 28, 28), np.float32)
    x[:, 8:20, 10:18] = rng.uniform(0.2, 1, (48, 1, 1))
    np.savez(tmp_path / "mini.npz", x_train=x, y_train=np.arange(48) % 3)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", str(tmp_path / "mini.npz"), "--steps", "3", "--batch-size", "8",
            "--channels", "8,16", "--T", "20", "--pairing", "ctrl", "--transform", "blur", "--samples", "2", "--eval", "0", "--quiet"]
    assert main(args) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_channels"] == [8, 16] and cfg["attention"] == [False, True] and cfg["pairing"] == "ctrl"
    assert load_run(out).step == 3
    assert main(args[:5] + ["--steps", "4"] + args[7:]) == 2  # same run directory, another configuration: one line
    assert "coupled-diffusion: error: " in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ValueError, match="different configuration"):  # the exception itself with --debug
        main(args[:5] + ["--steps", "4"] + args[7:] + ["--debug"])


@pytest.mark.slow  # ~45 s (a 400-step classifier); run with -m slow
def test_evaluate_run_scores_real_pairs_high_and_a_tiny_run_lower():
    run = train(TINY, data=_data(), progress=False)  # trained on squares: its samples are no digits
    q = cd.evaluate_run(run, 32, classifier_steps=400)
    assert q["n"] == 32 and sum(q["real"]["histogram"]) == 32 == sum(q["samples"]["histogram"])
    assert q["classifier_test_accuracy"] > 0.9 and q["real"]["recognisable"] > 0.75  # real MNIST test pairs
    assert q["samples"]["recognisable"] < q["real"]["recognisable"] - 0.3


@pytest.mark.slow  # ~90 s (a subprocess with 4 fake devices); run with -m slow
def test_data_parallel_training_and_sampling_on_4_fake_devices_equal_one_device():
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys; sys.path.insert(0, "tests")
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import coupled_diffusion as cd
        from coupled_diffusion.models.sharding import data_mesh, shard_batch
        from test_train import TINY, _data, _leaves
        assert len(jax.devices()) == 4
        data = _data()
        one = cd.train(TINY, data=data, progress=False, stop_at=3, mesh=data_mesh(jax.devices()[:1]))
        four = cd.train(TINY, data=data, progress=False, stop_at=3, mesh=data_mesh())
        for a, b in zip(_leaves(one.model), _leaves(four.model), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-5)  # Adam amplifies reduction-order noise in near-zero gradients
        sched, noise = cd.VPSchedule.linear(TINY.T), cd.ModeNoise.paired(TINY.g)
        z = noise.sample(jax.random.key(0), (8, 28, 28, 2))
        eps = cd.NNXEps(four.ema_model)
        ref = cd.sample(eps, sched, noise, jax.random.key(1), z, method="ddpm", log_at=(10,), clip=1.0)
        zs = shard_batch(z, data_mesh())
        out = cd.sample(eps, sched, noise, jax.random.key(1), zs, method="ddpm", log_at=(10,), clip=1.0)
        assert len(out.z0.sharding.device_set) == 4
        np.testing.assert_allclose(out.z0, ref.z0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.x0_log, ref.x0_log, rtol=1e-4, atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


OLD_RUN = pathlib.Path(__file__).parent / "data" / "run_0.1.0"


# tests/data/run_0.1.0: written by the flat-config layout of 0.1.0 (before the training module was
# split), a 4-step run stopped at step 2, in a process without x64 (training under x64 takes other
# float paths); the .npz holds that code's forward outputs at step 2 and of the same run trained
# without interruption to step 4
OLD_CONFIG = TrainConfig(block_channels=(8, 8), attention=(False, True), num_groups=4, attention_head_dim=4, n_train=256,
                         batch_size=16, steps=4, log_every=1, ckpt_every=2, warmup_steps=1, T=20)


def _old_run_inputs():
    return jax.random.normal(jax.random.key(0), (2, 28, 28, 2), np.float32), np.array([3, 17], np.int32)


def test_a_run_written_by_version_0_1_0_loads():
    ref = np.load(OLD_RUN.parent / "run_0.1.0_outputs.npz")
    with jax.enable_x64(False):
        z, t = _old_run_inputs()
        loaded = load_run(OLD_RUN)
        assert loaded.config == OLD_CONFIG and loaded.step == 2 and [h["step"] for h in loaded.history] == [1, 2]
        for m in ("model", "ema_model"):
            np.testing.assert_allclose(getattr(loaded, m)(z, t), ref[f"step2_{m}"], rtol=0, atol=1e-5)


@pytest.mark.slow  # ~50 s: a compilation of the step without x64 that no other default test shares
def test_a_run_written_by_version_0_1_0_resumes_exactly(tmp_path):
    ref = np.load(OLD_RUN.parent / "run_0.1.0_outputs.npz")
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    with jax.enable_x64(False):
        z, t = _old_run_inputs()
        resumed = train(OLD_CONFIG, run, progress=False)
        assert resumed.step == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
        for m in ("model", "ema_model"):
            np.testing.assert_allclose(getattr(resumed, m)(z, t), ref[f"step4_{m}"], rtol=0, atol=1e-5)
