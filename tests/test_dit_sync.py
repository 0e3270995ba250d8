"""`dit-sync` (the DiT paper's protocols on a DiT trained here): exact resumption, the protocols'
limiting cases, the run's files, and the command's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import coupled_diffusion as cd
from coupled_diffusion.cli import main
from coupled_diffusion.experiments.dit_sync import DiTSync, protocol1, protocol2, run_dit_sync, train_mnist_dit

TINY = dict(train_steps=12, ckpt_every=6, classifier_steps=10, num_steps=6, intervention_every=1, n_pairs=6, n_band=2,
            n_boot=20, gs=(0.5,), p2_gs=(0.0, 1.0), T=50)


def test_training_resumes_exactly_from_a_checkpoint(tmp_path):
    cfg = DiTSync.quick(**TINY)
    whole, _ = train_mnist_dit(cfg, tmp_path / "a", progress=False)
    train_mnist_dit(cfg, tmp_path / "b", progress=False, stop_at=6)          # killed after its checkpoint at step 6
    resumed, history = train_mnist_dit(cfg, tmp_path / "b", progress=False)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, whole)), jax.tree.leaves(jax.tree.map(np.asarray, resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert history[-1]["step"] == 12
    with pytest.raises(ValueError, match=r"holds a model trained with other settings \(fields \['lr'\]\)"):
        train_mnist_dit(DiTSync.quick(**{**TINY, "lr": 5e-4}), tmp_path / "b", progress=False)


def test_protocol_limits_identical_replicas_under_shared_noise_and_the_energy_normalisation():
    cfg = DiTSync.quick(**{**TINY, "init_eps": 0.0})
    model = cd.DiT(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                   learn_sigma=False, rngs=cd.models.dit.nnx.Rngs(0))
    # a DiT with random (non-zero) adaLN weights, so that every block acts
    leaves, tree = jax.tree.flatten(cd.models.dit.nnx.state(model))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    cd.models.dit.nnx.update(model, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                               for x, k in zip(leaves, keys, strict=True)]))
    schedule = cd.VPSchedule.linear(cfg.T)
    ks = cfg.intervention_points()
    pair = cd.dit_pair_eps(model, jnp.zeros(len(ks) * cfg.n_pairs, jnp.int32))
    encoder = lambda x: jnp.abs(x.reshape(x.shape[0], -1)) + 0.1  # noqa: E731
    # identical starts (eps = 0) and shared noise until k: at k = num_steps the replicas never separate
    r = protocol1(pair, schedule, encoder, cfg, g=0.0, shape=(28, 28, 1), key=jax.random.key(0), shared_noise=True)
    assert r["cosine"].shape == (cfg.n_pairs, len(ks)) and list(r["k"]) == ks
    np.testing.assert_allclose(r["cosine"][:, -1], 1, atol=1e-6)
    np.testing.assert_allclose(r["coarse"][:, -1], 1, atol=1e-6)
    np.testing.assert_allclose(r["fine"][:, -1], 1, atol=1e-6)
    assert np.all(r["fine"][:, 0] < 0.99)                                        # independent noise throughout: apart
    # Protocol II: at the first step each mode's energy averages to 1 over seeds (eq 76), in every block
    cfg2 = DiTSync.quick(**{**TINY, "init_eps": 0.2})
    p = protocol2(cd.dit_pair_eps(model, jnp.zeros(cfg2.n_pairs, jnp.int32)), schedule, cfg2, g=0.5, shape=(28, 28, 1),
                  key=jax.random.key(0))
    assert p["lead"].shape == (cfg2.num_steps, 2, cfg2.n_pairs)
    np.testing.assert_allclose(p["lead"][0].mean(-1), 1, rtol=1e-3)
    np.testing.assert_allclose(p["trail"][0].mean(-1), 1, rtol=1e-3)


def test_run_writes_table_summary_and_figures_and_resumes_per_coupling(tmp_path):
    cfg = DiTSync.quick(**TINY)
    out = tmp_path / "run"
    summary = run_dit_sync(cfg, out, progress=False)
    for name in ("table.md", "table.json", "summary.json", "protocol1_cosine.png", "protocol1_control.png",
                 "protocol1_coarse_fine.png", "protocol2_depth.png", "protocol2_time.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(summary["claims"]) == {"gap_at_g0", "collapse_toward_g1", "localised_in_last_blocks", "coarse_before_fine"}
    assert set(summary["protocol2"]) == {"0", "1"} and len(summary["protocol2"]["0"]["R"]) == 2
    before = json.loads((out / "table.json").read_text())
    (out / "eval" / "p2_g1p00.npz").unlink()                                    # one coupling's result lost
    run_dit_sync(cfg, out, progress=False)
    assert json.loads((out / "table.json").read_text()) == before               # recomputed to the same numbers
    with pytest.raises(ValueError, match=r"holds a dit-sync run with other settings \(fields \['n_pairs'\]\)"):
        run_dit_sync(DiTSync.quick(**{**TINY, "n_pairs": 8}), out, progress=False)


def test_dit_sync_command_rejects_bad_flags_before_any_work(tmp_path, capsys):
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--gs", "0.5,1.5"]) == 2
    assert "`gs` must be a non-empty list of couplings in [0, 1]" in capsys.readouterr().err
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--pairs", "3"]) == 2
    assert "`n_band` must satisfy 2 n_band <= n_pairs - 1" in capsys.readouterr().err
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
