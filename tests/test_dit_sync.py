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
            n_boot=20, gs=(0.5,), p2_gs=(0.0, 1.0), T=50, quality_per_class=2)


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """512 training and 256 test images of the bundled MNIST as an .npz (`--data`), so the runs load little."""
    from coupled_diffusion.data.mnist import load_mnist

    (xtr, ytr), (xte, yte) = load_mnist("train"), load_mnist("test")
    path = tmp_path_factory.mktemp("mnist") / "small.npz"
    np.savez(path, x_train=xtr[:512], y_train=ytr[:512], x_test=xte[:256], y_test=yte[:256])
    return str(path)


def test_run_trains_resumably_writes_table_summary_and_figures_and_resumes_per_coupling(tmp_path, small_mnist):
    cfg = DiTSync.quick(**TINY, data_path=small_mnist)
    out = tmp_path / "run"
    summary = run_dit_sync(cfg, out, progress=False)
    for name in ("table.md", "table.json", "summary.json", "protocol1_cosine.png", "protocol1_control.png",
                 "protocol1_coarse_fine.png", "protocol2_depth.png", "protocol2_time.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(summary["claims"]) == {"gap_at_g0", "collapse_toward_g1", "localised_in_last_blocks", "coarse_before_fine"}
    assert set(summary["protocol2"]) == {"0", "1"} and len(summary["protocol2"]["0"]["R"]) == 2
    assert 0 <= summary["sample_quality"]["match"] <= 1 and len(summary["sample_quality"]["per_class"]) == 10
    before = json.loads((out / "table.json").read_text())
    (out / "eval" / "p2_g1p00.npz").unlink()                                    # one coupling's result lost
    run_dit_sync(cfg, out, progress=False)
    assert json.loads((out / "table.json").read_text()) == before               # recomputed to the same numbers
    with pytest.raises(ValueError, match=r"holds a dit-sync run with other settings \(fields \['n_pairs'\]\)"):
        run_dit_sync(DiTSync.quick(**{**TINY, "n_pairs": 8}, data_path=small_mnist), out, progress=False)
    # the model training resumes exactly: killed after its checkpoint at step 6, then resumed, it ends where the run's did
    whole, _ = train_mnist_dit(cfg, out, progress=False)                        # restored, not retrained
    train_mnist_dit(cfg, tmp_path / "b", progress=False, stop_at=6)
    resumed, history = train_mnist_dit(cfg, tmp_path / "b", progress=False)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, whole)), jax.tree.leaves(jax.tree.map(np.asarray, resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert history[-1]["step"] == 12
    with pytest.raises(ValueError, match=r"holds a model trained with other settings \(fields \['lr'\]\)"):
        train_mnist_dit(DiTSync.quick(**{**TINY, "lr": 5e-4}, data_path=small_mnist), tmp_path / "b", progress=False)


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


def test_dit_sync_command_rejects_bad_flags_before_any_work(tmp_path, capsys):
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--gs", "0.5,1.5"]) == 2
    assert "`gs` must be a non-empty list of couplings in [0, 1]" in capsys.readouterr().err
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--pairs", "3"]) == 2
    assert "`n_band` must satisfy 2 n_band <= n_pairs - 1" in capsys.readouterr().err
    assert main(["dit-sync", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pretrained_path_runs_on_small_random_models_in_both_formats(tmp_path):
    """The DiT-XL/2 path (a latent DiT, the VAE decoder, ResNet-50 features) on small random models."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torchvision = pytest.importorskip("torchvision")
    from test_pretrained import _official_state_dict, _tie_embedders

    from coupled_diffusion.experiments.dit_sync import pretrained_backbone

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                                          sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    _tie_embedders(dit)
    dit.save_pretrained(tmp_path / "dit")
    torch.save(_official_state_dict(dit), tmp_path / "dit.pt")
    diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
                            ).save_pretrained(tmp_path / "vae")
    np.savez(tmp_path / "resnet50.npz", **{k: v.numpy() for k, v in torchvision.models.resnet50(num_classes=10).state_dict().items()})

    cfg = DiTSync.quick(**{**TINY, "label": 7, "num_steps": 4, "n_pairs": 4, "n_band": 1})
    backbone = pretrained_backbone(tmp_path / "dit", tmp_path / "vae", tmp_path / "resnet50.npz", chunk=8)
    assert backbone.shape == (8, 8, 4) and backbone.schedule.T == 1000
    summary = run_dit_sync(cfg, tmp_path / "run", backbone=backbone, progress=False)
    assert len(summary["protocol2"]["0"]["R"]) == 3
    assert json.loads((tmp_path / "run" / "dit_sync.json").read_text())["backbone"]["vae"] == str(tmp_path / "vae")
    r = np.load(tmp_path / "run" / "eval" / "p1_g0p50.npz")
    assert r["example"].shape[-3:] == (16, 16, 3) and np.all(np.abs(r["example"]) <= 1)   # decoded images
    official = pretrained_backbone(tmp_path / "dit.pt", tmp_path / "vae", tmp_path / "resnet50.npz", num_heads=2)
    assert official.model.blocks[0].attn.num_heads == 2 and official.model.num_classes == 10
    with pytest.raises(FileNotFoundError, match=r"--vae .*: not found. Pass a local diffusers AutoencoderKL folder"):
        pretrained_backbone(tmp_path / "dit", tmp_path / "novae", tmp_path / "resnet50.npz")


def test_dit_sync_command_needs_all_three_pretrained_paths(tmp_path, capsys):
    assert main(["dit-sync", "--out", str(tmp_path / "y"), "--weights", str(tmp_path), "--vae", str(tmp_path)]) == 2
    assert "needs --weights, --vae and --encoder together; missing --encoder" in capsys.readouterr().err
    assert main(["dit-sync", "--out", str(tmp_path / "y"), "--bf16"]) == 2
    assert "--bf16 applies to a pretrained DiT run" in capsys.readouterr().err
