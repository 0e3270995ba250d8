"""The Section 5 protocols wired end to end on a tiny (untrained) U-Net: shapes, determinism, the intervention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import coupled_diffusion as cd
from coupled_diffusion.diffusion.sync import cosine_to_final
from coupled_diffusion.experiments.mnist_sync import intervention_curve, intervention_effect, protocol1


@pytest.fixture(scope="module")
def tiny():
    model = cd.UNet(in_channels=2, block_channels=(8, 8), layers_per_block=1, attention=(False, False), num_groups=4,
                    rngs=nnx.Rngs(0))
    return cd.NNXEps(model), cd.VPSchedule.linear(20), cd.ModeNoise.paired(0.5)


def test_protocol1_shapes_and_determinism(tiny):
    a = protocol1(*tiny, n=3, seed=1)
    b = protocol1(*tiny, n=3, seed=1)
    assert a["t"].tolist() == list(range(19, -1, -1))
    assert a["cos_u"].shape == a["cos_v"].shape == a["ghosting"].shape == (20,)
    assert a["trajectory"].shape == (20, 28, 28, 2) and a["final"].shape == (3, 28, 28, 2)
    assert a["cos_u"][-1] == pytest.approx(1.0) and a["cos_v"][-1] == pytest.approx(1.0)  # the last row is the reference
    for k in ("cos_u", "cos_v", "c_a", "c_b", "final"):
        np.testing.assert_array_equal(a[k], b[k])  # a fixed seed gives identical numbers
    for tau, g in a["gaps"].items():
        assert g["t_u"] == b["gaps"][tau]["t_u"] and g["t_v"] == b["gaps"][tau]["t_v"]
        if g["t_u"].found and g["t_v"].found:
            assert g["gap"] == g["t_v"].time - g["t_u"].time
        else:
            assert math.isnan(g["gap"])
    # eq (98) recomputed here from the trajectory of sample 0 alone is not the batch mean; from all samples it is:
    # u of the logged x0-hats, independently of the module (u = (x_A + x_B) / sqrt 2, eq 91)
    c = protocol1(*tiny, n=1, seed=1)
    u = (c["trajectory"][..., 0] + c["trajectory"][..., 1]) / np.sqrt(2)
    np.testing.assert_allclose(c["cos_u"], cosine_to_final(u[:, None]), rtol=1e-5)


def test_the_intervention_changes_only_v_at_its_step(tiny):
    eps_fn, sched, noise = tiny
    z_t = noise.sample(jax.random.key(3), (2, 28, 28, 2))
    kw = dict(method="ddim", log_at=(12,))
    base = cd.sample(eps_fn, sched, noise, jax.random.key(4), z_t, **kw)
    hit = cd.sample(eps_fn, sched, noise, jax.random.key(4), z_t, intervention=cd.Intervention(jnp.int32(12), jnp.float32(0.5), 1),
                    **kw)
    m0, m1 = (np.asarray(noise.to_modes(r.z_log[0]), np.float64) for r in (base, hit))
    scale = np.abs(np.asarray(base.z_log[0])).max()  # an untrained network's states are large: float32 rounding of z + bump
    np.testing.assert_allclose(m1[..., 0], m0[..., 0], rtol=0, atol=4 * np.finfo(np.float32).eps * scale)  # u untouched
    dv = m1[..., 1] - m0[..., 1]
    assert np.std(dv) == pytest.approx(0.5, rel=0.05)  # v moved by sigma xi, xi standard normal (2 x 784 draws)


def test_intervention_curve_is_one_compile_and_matches_single_runs(tiny):
    eps_fn, sched, noise = tiny
    curve = intervention_curve(eps_fn, sched, noise, t_ints=[15, 5], sigma=0.3, n=2, seed=2)
    one = intervention_effect(eps_fn, sched, noise, t_int=5, sigma=0.3, n=2, seed=2)
    assert curve[1] == one
    assert all(r["rms_v"] > 0 and np.isfinite(r["rms_u"]) for r in curve)
    none = intervention_effect(eps_fn, sched, noise, t_int=5, sigma=0.0, n=2, seed=2)
    assert none["rms_u"] == 0 and none["rms_v"] == 0


@pytest.mark.parametrize(("kw", "match"), [
    pytest.param(dict(t_ints=[7.5]), r"`t_ints` must be a non-empty list of timesteps on the sampler's grid", id="off-grid"),
    pytest.param(dict(t_ints=[]), r"`t_ints` must be a non-empty list", id="empty"),
    pytest.param(dict(t_ints=[5], sigma=-1.0), r"`sigma` must be >= 0", id="negative-sigma"),
    pytest.param(dict(t_ints=[5], n=0), r"`n` \(the evaluation batch\) must be a positive integer", id="n-0"),
])
def test_intervention_bad_input(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        intervention_curve(*tiny, **kw)


def test_a_traced_intervention_time_off_the_grid_is_a_runtime_error(tiny):
    eps_fn, sched, noise = tiny
    z = noise.sample(jax.random.key(0), (1, 28, 28, 2))
    with pytest.raises(Exception, match="`intervention.t` is not on the sampler's grid"):
        jax.block_until_ready(cd.sample(eps_fn, sched, noise, jax.random.key(1), z, num_steps=10,
                                        intervention=cd.Intervention(jnp.int32(3), jnp.float32(0.1), 1)).z0)


def _two_class_data(n=64, seed=0):
    """Two 'digits': a bright block top-left (class 0) or bottom-right (class 7), with noise."""
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, 0, 7)
    x = rng.uniform(0, 0.2, (n, 28, 28)).astype(np.float32)
    for i in range(n):
        r, c = (4, 4) if y[i] == 0 else (16, 16)
        x[i, r:r + 8, c:c + 8] = rng.uniform(0.7, 1.0)
    return cd.PairedMNIST(x, y, transform="blur")


@pytest.fixture(scope="module")
def classifiers():
    from coupled_diffusion.experiments.mnist_sync import fit_mode_classifiers

    return fit_mode_classifiers(_two_class_data(), _two_class_data(seed=1), steps=150, batch_size=32)


def test_mode_classifiers_learn_two_classes_and_c_v_ignores_the_sign(classifiers):
    from coupled_diffusion.experiments.mnist_sync import mode_images

    assert classifiers["classes"] == (0, 7)
    assert classifiers["test_accuracy_u"] >= 0.95 and classifiers["test_accuracy_v"] >= 0.95
    z = _two_class_data(8, seed=2).batch(jnp.arange(8), jnp.arange(8), jax.random.key(0))
    _, v = mode_images(z)
    np.testing.assert_allclose(np.asarray(classifiers["c_v"](v)), np.asarray(classifiers["c_v"](-v)), rtol=1e-5, atol=1e-6)
    u_ref = ((z[..., 0] + 1) / 2 + (z[..., 1] + 1) / 2) / 2  # eq (103), written out
    np.testing.assert_allclose(np.asarray(mode_images(z)[0]), np.asarray(u_ref), rtol=1e-6)


@pytest.fixture(scope="module")
def oracle():
    """The exact eps of two prototype pairs, one per class: samples are exactly one prototype, and clones
    from late states agree while clones from the noise do not, so the crossing is known to exist."""
    data = _two_class_data(8, seed=5)
    proto = data.batch(jnp.array([0, 1]), jnp.array([0, 1]), jax.random.key(0))  # class 0 and class 7
    sched, noise = cd.VPSchedule.linear(20), cd.ModeNoise.paired(0.5)
    return cd.EmpiricalEps(proto, sched, noise), sched, noise


def test_protocol2_with_the_exact_eps_of_two_prototypes(oracle, classifiers):
    from coupled_diffusion.experiments.mnist_sync import classify_modes, protocol2

    eps_fn, sched, noise = oracle
    z = cd.sample(eps_fn, sched, noise, jax.random.key(1), noise.sample(jax.random.key(2), (64, 28, 28, 2)), method="ddpm").z0
    diff = (np.asarray(z)[:, None] - np.asarray(eps_fn.points)[None]).reshape(64, 2, -1)
    dist = np.linalg.norm(diff, axis=-1)
    assert np.all(dist.min(1) < 0.05 * np.linalg.norm(np.asarray(eps_fn.points)[0]))  # every sample is a prototype
    y_u, _ = classify_modes(classifiers, z)
    assert 0.2 < np.mean(y_u) < 0.8  # both classes drawn

    kw = dict(scan_t=[19, 10, 2], n=32, repeats=2, seed=3)
    a, b = protocol2(eps_fn, sched, noise, classifiers, **kw), protocol2(eps_fn, sched, noise, classifiers, **kw)
    assert a["t"].tolist() == [2, 10, 19] and a["n_pairs"] == 64
    for m in "uv":
        phi, ex = a[f"phi_{m}"], a[f"ex_{m}"]
        np.testing.assert_array_equal(phi["value"], b[f"phi_{m}"]["value"])  # a fixed seed gives identical numbers
        assert np.all((phi["lower"] <= phi["value"]) & (phi["value"] <= phi["upper"]))
        p_ind = a[f"phi_indep_{m}"]["value"]
        assert 0.3 < p_ind < 0.75  # two classes drawn about evenly
        np.testing.assert_allclose(ex["lower"], (phi["lower"] - p_ind) / (1 - p_ind))
        assert phi["value"][0] == 1.0  # clones from t = 2 are (almost) clean: they agree
        assert ex["value"][-1] < 0.55  # clones from the noise end are independent
        assert a[f"t_spec_{m}"].found and 2 < a[f"t_spec_{m}"].time < 19 and a[f"t_spec_{m}"] == b[f"t_spec_{m}"]


@pytest.mark.parametrize(("kw", "match"), [
    pytest.param(dict(scan_t=[]), r"`scan_t` must be a non-empty set of timesteps", id="empty-scan"),
    pytest.param(dict(scan_t=[3]), r"`scan_t` must be a non-empty set of timesteps on the sampler's grid", id="off-grid"),
    pytest.param(dict(scan_t=[4], phi_star=1.5), r"`phi_star` must lie in \(0, 1\)", id="phi-star"),
    pytest.param(dict(scan_t=[4], repeats=0), r"`repeats` must be a positive integer", id="repeats"),
])
def test_protocol2_bad_input(oracle, classifiers, kw, match):
    from coupled_diffusion.experiments.mnist_sync import protocol2

    with pytest.raises(ValueError, match=match):
        protocol2(*oracle, classifiers, num_steps=10, n=2, **kw)


def test_empirical_eps_is_the_posterior_mean_denoiser_written_with_the_covariance():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((3, 2, 1, 2)).astype(np.float32)  # three points of 2 pixels x 2 channels
    sched, noise = cd.VPSchedule.linear(50), cd.ModeNoise.paired(0.6)
    z = rng.standard_normal((4, 2, 1, 2)).astype(np.float32)
    t = np.array([3, 10, 25, 49])
    got = np.asarray(cd.EmpiricalEps(pts, sched, noise)(jnp.asarray(z), jnp.asarray(t)), np.float64)
    cov_inv = np.linalg.inv(np.asarray(noise.covariance, np.float64))  # channel covariance [[1, -g], [-g, 1]] (eq 93)
    for b in range(4):
        ab = float(np.asarray(sched.alphas_cumprod, np.float64)[t[b]])
        r = z[b][None].astype(np.float64) - np.sqrt(ab) * pts  # (3, 2, 1, 2)
        logw = -0.5 * np.einsum("npqc,cd,npqd->n", r, cov_inv, r) / (1 - ab)
        w = np.exp(logw - logw.max())
        x0 = np.tensordot(w / w.sum(), pts.astype(np.float64), axes=1)
        np.testing.assert_allclose(got[b], (z[b] - np.sqrt(ab) * x0) / np.sqrt(1 - ab), rtol=2e-4, atol=2e-5)


def test_ou_time_maps_to_the_timestep_with_the_same_signal_level():
    from coupled_diffusion.experiments.mnist_sync import timestep_of_ou_time

    sched = cd.VPSchedule.linear(200)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    s = -0.5 * np.log(ab[[0, 37, 150, 199]])  # e^{-2s} = alpha_bar_t exactly
    np.testing.assert_allclose(timestep_of_ou_time(sched, s), [0, 37, 150, 199], atol=1e-6)
    mid = -0.25 * (np.log(ab[40]) + np.log(ab[41]))  # halfway in log alpha_bar
    assert timestep_of_ou_time(sched, mid) == pytest.approx(40.5)
    assert np.isnan(timestep_of_ou_time(sched, 50.0))  # beyond the schedule's noise end


def test_mode_theory_orders_u_before_v_more_with_g():
    from coupled_diffusion.experiments.mnist_sync import mode_theory

    rows = mode_theory(_two_class_data(64), cd.VPSchedule.linear(200), [0.0, 0.3, 0.6])
    t_u, t_v = [r["t_u"] for r in rows], [r["t_v"] for r in rows]
    assert all(np.isfinite(t_u + t_v))
    assert t_u[0] < t_u[1] < t_u[2] and t_v[0] > t_v[1] > t_v[2]  # eq (95): u's SNR rises with g, v's falls
    assert [r["snr_ratio"] for r in rows] == pytest.approx([1.0, 1.3 / 0.7, 1.6 / 0.4])
    assert rows[2]["gap"] < rows[1]["gap"] < rows[0]["gap"]


def test_protocols_split_their_batch_over_4_fake_devices_with_the_same_numbers():
    """A sweep on several devices runs the protocols data parallel: the weights replicated, the
    batch split; the results are those of one device (to float rounding)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import types
        import jax, numpy as np
        from flax import nnx
        import coupled_diffusion as cd
        import coupled_diffusion.experiments.mnist_sync as ms

        assert jax.device_count() == 4
        model = cd.UNet(in_channels=2, block_channels=(8, 8), layers_per_block=1, attention=(False, False), num_groups=4,
                        rngs=nnx.Rngs(0))
        eps_fn, sched, noise = ms.run_eps(types.SimpleNamespace(config=cd.TrainConfig(T=12, g=0.5), ema_model=model))
        assert all(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(eps_fn.state))  # the weights replicated
        z, _ = ms._start(noise, 8, 0)
        assert len(z.sharding.device_set) == 4 and z.addressable_shards[0].data.shape[0] == 2  # the batch split
        assert len(ms._start(noise, 6, 0)[0].sharding.device_set) == 1  # 6 does not split over 4: left whole
        # the numbers: the exact eps of three random pairs (bounded outputs), split against whole
        pts = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 2))
        oracle = cd.EmpiricalEps(pts, sched, noise)
        split = ms.protocol1(oracle, sched, noise, n=8, seed=2)
        ms._spread = lambda z: z
        whole = ms.protocol1(oracle, sched, noise, n=8, seed=2)
        for key in ("final", "cos_u", "cos_v", "ghosting"):
            np.testing.assert_allclose(split[key], whole[key], rtol=1e-4, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_schedule_ou_time_and_timestep_are_inverse_and_match_alphabar():
    sched = cd.VPSchedule.cosine(300)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    n = np.array([0, 5, 123, 299])
    np.testing.assert_allclose(np.asarray(sched.ou_time(n)), -0.5 * np.log(ab[n]), rtol=1e-12)
    frac = np.array([0.25, 17.5, 298.9])
    np.testing.assert_allclose(np.asarray(sched.timestep(sched.ou_time(frac))), frac, rtol=1e-9)
    s_mid = 0.5 * (-0.5 * np.log(ab[10]) - 0.5 * np.log(ab[11]))
    assert int(sched.timestep(s_mid + 1e-9, discrete=True)) == 11 and int(sched.timestep(s_mid - 1e-9, discrete=True)) == 10
    assert int(sched.timestep(1e3, discrete=True)) == 299 and float(sched.timestep(1e3)) == 299  # clipped by default
