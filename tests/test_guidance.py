"""Guidance windows (issue 19): per-timestep classifier-free guidance weights, their OU-time strength against closed
forms, `GuidedEps` against separate conditional / unconditional calls, and the pulse-vs-constant comparison wired
end to end on a tiny DiT."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import coupled_diffusion as cd
from coupled_diffusion.experiments.dit_sync import DigitClassifier
from coupled_diffusion.experiments.patterns import guidance_comparison


def test_window_weights_and_their_strength_have_the_closed_forms():
    sched = cd.VPSchedule.linear(100)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    lo, hi = 0.3, 0.8
    w = cd.guidance_weights(sched, 2.5, (lo, hi))
    inside = (ab <= np.exp(-2 * lo)) & (ab >= np.exp(-2 * hi))  # the window in signal level: alphabar in [e^{-2 hi}, e^{-2 lo}]
    np.testing.assert_array_equal(w, np.where(inside, 3.5, 1.0))
    assert cd.guidance_strength(sched, cd.guidance_weights(sched, 0.0)) == 0.0
    # constant extra weight c over every step telescopes to c s(t_0), s = -log(alphabar) / 2
    ts = cd.diffusion.samplers.timesteps(100, 20)
    assert cd.guidance_strength(sched, cd.guidance_weights(sched, 1.7), 20) == pytest.approx(1.7 * -0.5 * np.log(ab[ts[0]]), rel=1e-6)
    c = cd.matched_constant_scale(sched, 2.5, (lo, hi), 20)
    pulse = cd.guidance_strength(sched, w, 20)
    assert cd.guidance_strength(sched, cd.guidance_weights(sched, c), 20) == pytest.approx(pulse, rel=1e-6)
    s = -0.5 * np.log(ab)
    steps = [(ts[i], s[ts[i]] - (s[ts[i + 1]] if i + 1 < len(ts) else 0.0)) for i in range(len(ts))]
    assert pulse == pytest.approx(sum(2.5 * ds for t, ds in steps if lo <= s[t] <= hi), rel=1e-12)
    with pytest.raises(ValueError, match="window"):
        cd.guidance_weights(sched, 1.0, (0.8, 0.3))
    with pytest.raises(ValueError, match="scale"):
        cd.guidance_weights(sched, -1.0)


def tiny_dit():
    return cd.DiT(input_size=28, patch_size=7, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=10, learn_sigma=False,
                  class_dropout_prob=0.1, rngs=nnx.Rngs(0))


def test_guided_eps_is_the_classifier_free_mixture_with_a_per_timestep_weight():
    model = tiny_dit()
    z = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    y = jnp.array([1, 4, 7])
    t = jnp.array([5, 40, 90])
    w = np.linspace(0.5, 3.0, 100).astype(np.float32)
    got = eqx.filter_jit(lambda g, z, t: g(z, t))(cd.GuidedEps(model, y, w), z, t)
    call = nnx.jit(lambda m, z, t, y: m(z, t, y))
    cond, uncond = call(model, z, t, y), call(model, z, t, jnp.full((3,), 10))
    want = uncond + w[np.asarray(t)][:, None, None, None] * (cond - uncond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = eqx.filter_jit(lambda g, z, t: g(z, t))(cd.GuidedEps(model, y, np.ones(100)), z, t)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(cond), rtol=1e-5, atol=1e-5)


def test_guidance_comparison_runs_paired_and_matches_strengths():
    sched = cd.VPSchedule.linear(50)
    rng = np.random.default_rng(0)  # an exact class-conditional model whose classes differ (a fresh DiT's output is zero)
    A = rng.normal(0, 0.05, (10, 784, 3))
    model = cd.GaussianMixtureEps(rng.uniform(-1, 1, (10, 784)), A @ np.swapaxes(A, 1, 2) + 0.01 * np.eye(784), np.ones(10), sched,
                                  shape=(28, 28, 1))
    out = guidance_comparison(model, DigitClassifier(rngs=nnx.Rngs(1)), sched, t_c=0.8, half_width=0.3, scale=2.0, per_class=2,
                              num_steps=10, n_boot=20, controls=(0.8, 1.6), key=jax.random.key(3))
    c = out["conditions"]
    assert c["none"]["strength"] == 0.0 and c["pulse"]["strength"] == pytest.approx(c["constant"]["strength"], rel=1e-6)
    for r in c.values():
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and r["diversity"] > 0
    for diff in out["differences"].values():
        assert all(v["ci"][0] <= v["ci"][1] for v in diff.values())
    assert out["differences"]["pulse-none"]["accuracy"]["value"] == pytest.approx(c["pulse"]["accuracy"] - c["none"]["accuracy"])
    assert out["samples"]["pulse"].shape == (10, 28, 28)
    # a control centred at t_c is the pulse itself (same weights, same random numbers): equal samples, zero differences
    np.testing.assert_array_equal(out["samples"]["pulse@0.80"], out["samples"]["pulse"])
    assert all(v["value"] == 0 and v["ci"] == [0, 0] for v in out["differences"]["pulse-pulse@0.80"].values())
    assert not np.array_equal(out["samples"]["pulse@1.60"], out["samples"]["pulse"])
    from coupled_diffusion.plotting import plot_guidance

    assert len(plot_guidance(out).axes) == 3 + 5  # the three metrics, one sample row per condition


@pytest.mark.slow  # ~1 min: a tiny DiT and classifier trained, its rates, t_c and the comparison
def test_dit_patterns_end_to_end_on_a_tiny_run(tmp_path):
    from coupled_diffusion.experiments.dit_sync import DiTSync
    from coupled_diffusion.experiments.patterns import dit_patterns

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 28, 28)).astype(np.float32)
    y = np.arange(40) % 10
    np.savez(tmp_path / "mini.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    cfg = DiTSync(hidden_size=16, depth=1, num_heads=2, patch_size=7, T=50, train_steps=3, batch_size=8, warmup_steps=1, ckpt_every=3,
                  classifier_steps=3, num_steps=10, intervention_every=2, n_pairs=8, data_path=str(tmp_path / "mini.npz"))
    out = dit_patterns(tmp_path / "run", cfg=cfg, per_class=2, num_steps=10, n_times=6, shells=3, progress=False)
    net = out["dit"]
    assert len(net["top"]) == len(net["timesteps"]) and np.all(np.isfinite(net["top"]))
    g = out["guidance"]
    assert ("skipped" in g) == (net["t_c"] is None)
    if "conditions" in g:
        assert set(g["conditions"]) == {"none", "pulse", "constant"}
