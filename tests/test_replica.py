"""Replica coupling in DiT attention (the DiT paper's eq 16-19 and 67-69): against independent NumPy code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import coupled_diffusion as cd


def _numpy_replica_attention(q, k, v, g):
    """Eq (16-19) written out per replica, batch element and head: the joint logit matrix of the
    concatenated token sequence, cut into its four blocks, a row-wise softmax inside each block, and
    the (1 - g/2, g/2) mixture of the intra- and inter-replica outputs."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    d = q.shape[-1]
    for idx in np.ndindex(q.shape[1:-2]):
        qs = [q[(r,) + idx] for r in range(2)]
        ks = np.concatenate([k[(0,) + idx], k[(1,) + idx]])   # the joint sequence: replica 1's tokens, then replica 2's
        vs = np.concatenate([v[(0,) + idx], v[(1,) + idx]])
        nk = k.shape[-2]
        for a in range(2):
            logits = qs[a] @ ks.T / np.sqrt(d)                  # (nq, 2 nk): blocks [a1 | a2]
            blocks = []
            for b in range(2):
                blk = logits[:, b * nk:(b + 1) * nk]
                e = np.exp(blk - blk.max(1, keepdims=True))
                blocks.append(e / e.sum(1, keepdims=True) @ vs[b * nk:(b + 1) * nk])
            out[(a,) + idx] = (1 - g / 2) * blocks[a] + (g / 2) * blocks[1 - a]
    return out


def _qkv(shape, seed=0, scale=1.5):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) * scale for _ in range(3))


@pytest.mark.parametrize("g", [0.0, 0.3, 0.75, 1.0])
def test_replica_attention_matches_numpy_eq_16_to_19(g):
    q, k, v = _qkv((2, 3, 2, 5, 4), seed=int(10 * g))
    np.testing.assert_allclose(cd.replica_attention(q, k, v, g), _numpy_replica_attention(q, k, v, g), atol=1e-12)


def test_replica_attention_at_g0_is_plain_attention_and_swapping_replicas_swaps_outputs():
    q, k, v = _qkv((2, 4, 3, 6, 8), seed=3)
    out0 = cd.replica_attention(q, k, v, 0.0)
    for r in range(2):  # each replica attends to itself only: jax's own attention in (B, T, N, H)
        t = lambda a: jnp.asarray(a[r]).transpose(0, 2, 1, 3)  # noqa: E731
        ref = jax.nn.dot_product_attention(t(q).astype(jnp.float32), t(k).astype(jnp.float32), t(v).astype(jnp.float32))
        np.testing.assert_allclose(out0[r], np.asarray(ref).transpose(0, 2, 1, 3), atol=2e-6)
    out = cd.replica_attention(q, k, v, 0.6)
    swapped = cd.replica_attention(q[::-1], k[::-1], v[::-1], 0.6)
    np.testing.assert_allclose(swapped, out[::-1], atol=1e-14)
    # different numbers of query and key tokens (cross-attention shapes) are allowed
    kk, vv = _qkv((2, 4, 3, 9, 8), seed=4)[:2]
    np.testing.assert_allclose(cd.replica_attention(q, kk, vv, 0.4), _numpy_replica_attention(q, kk, vv, 0.4), atol=1e-12)


def test_replica_attention_gradients_match_finite_differences():
    from jax.test_util import check_grads

    q, k, v = (jnp.asarray(a) for a in _qkv((2, 1, 2, 4, 3), seed=5, scale=1.0))
    check_grads(lambda q, k, v, g: cd.replica_attention(q, k, v, g), (q, k, v, jnp.asarray(0.4)), order=1, modes=["rev"])


def test_replica_attention_bad_g_is_an_error_and_a_result_code_under_jit():
    q, k, v = _qkv((2, 1, 1, 3, 2))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"`g` must be a coupling strength in \[0, 1\]"):
            cd.replica_attention(q, k, v, bad)
    with pytest.raises(ValueError, match="`g` must be a scalar"):
        cd.replica_attention(q, k, v, np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"`q` must be \(2, \*batch, heads, tokens, head_dim\)"):
        cd.replica_attention(q[:1], k[:1], v[:1], 0.1)
    with pytest.raises(ValueError, match="`k` and `v` must share a shape"):
        cd.replica_attention(q, k[..., :1], v, 0.1)
    soft = jax.jit(lambda g: cd.replica_attention(q, k, v, g, throw=False))
    sol = soft(1.5)
    assert sol.result == cd.RESULTS.coupling_out_of_range and np.all(np.isnan(sol.value))
    good = soft(0.5)
    assert good.result == cd.RESULTS.successful
    np.testing.assert_allclose(good.value, _numpy_replica_attention(q, k, v, 0.5), atol=1e-12)
    with pytest.raises(Exception, match="g must lie in"):  # a run-time error (its class differs with EQX_ON_ERROR)
        jax.jit(lambda g: cd.replica_attention(q, k, v, g))(2.0).block_until_ready()


def _random_dit(**kw):
    model = cd.DiT(**kw, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [0.2 * jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)]  # a fresh DiT is zero-output
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


DIT = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)


def test_coupled_dit_at_g0_is_two_uncoupled_forwards_and_couples_otherwise():
    model = _random_dit(**DIT)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 2)))
    t, y = jnp.array([10.0, 400.0, 900.0]), jnp.array([0, 3, 4])
    out0, hidden0 = cd.coupled_dit(model, x, t, y, g=0.0, return_hidden=True)
    assert out0.shape == (2, 3, 8, 8, 4) and hidden0.shape == (2, 2, 3, 16, 32)
    for r in range(2):
        ref, ref_hidden = model(x[r], t, y, return_hidden=True)
        np.testing.assert_allclose(out0[r], ref, atol=1e-12)
        np.testing.assert_allclose(hidden0[:, r], ref_hidden, atol=1e-12)
    out = cd.coupled_dit(model, x, t, y, g=0.7)
    for r in range(2):
        assert float(jnp.max(jnp.abs(out[r] - out0[r]))) > 1e-3   # the coupling changes each replica
    np.testing.assert_allclose(cd.coupled_dit(model, x[::-1], t, y, g=0.7), out[::-1], atol=1e-12)
    # identical replicas stay identical at every g (the mixture of two equal attentions)
    same = jnp.stack([x[0], x[0]])
    for g in (0.3, 1.0):
        o = cd.coupled_dit(model, same, t, y, g=g)
        np.testing.assert_allclose(o[0], o[1], atol=1e-12)
    # coupling only in the last block: the earlier blocks' states are the uncoupled ones
    _, hidden_last = cd.coupled_dit(model, x, t, y, g=0.7, blocks=[1], return_hidden=True)
    np.testing.assert_allclose(hidden_last[0], hidden0[0], atol=1e-12)
    assert float(jnp.max(jnp.abs(hidden_last[1] - hidden0[1]))) > 1e-3
    with pytest.raises(ValueError, match=r"`blocks` must be block indices in \[0, 2\)"):
        cd.coupled_dit(model, x, t, y, g=0.5, blocks=[2])
    with pytest.raises(ValueError, match=r"`x` must be \(2, B, H, W, C\)"):
        cd.coupled_dit(model, x[0], t, y, g=0.5)
    with pytest.raises(ValueError, match=r"`t` must be a scalar, \(B,\) = \(3,\) or \(2, B\)"):
        cd.coupled_dit(model, x, t[:2], y, g=0.5)
    with pytest.raises(ValueError, match=r"`g` must be a coupling strength in \[0, 1\]"):
        cd.coupled_dit(model, x, t, y, g=1.2)


def test_replica_init_has_the_moments_of_eq_67_to_69():
    n = 200_000
    z = jax.random.normal(jax.random.key(0), (n,))
    for eps in (0.0, 0.1, 0.5, 0.8):
        z1, z2 = cd.replica_init(jax.random.key(1), z, eps)
        c = np.cov(np.asarray(z1), np.asarray(z2))
        tol = 4 / np.sqrt(n)  # Monte Carlo: about 4 standard errors
        assert abs(c[0, 0] - 1) < 2.5 * tol and abs(c[1, 1] - 1) < 2.5 * tol
        assert abs(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]) - (1 - 2 * eps)) < tol
        np.testing.assert_allclose((z1 + z2) / 2, np.sqrt(1 - eps) * z, atol=1e-12)   # the shared part
    with pytest.raises(ValueError, match=r"`eps` must be a scalar in \[0, 1\]"):
        cd.replica_init(jax.random.key(1), z, 1.5)


# ------------------------------------------------------------------------------------------------ Protocol measurements


def test_scale_split_matches_torch_adaptive_pooling_and_bilinear_upsampling():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(0)
    for h, w, size in ((28, 28, 4), (32, 32, 8), (13, 17, 5), (9, 9, 1)):
        x = rng.standard_normal((2, h, w, 3))
        xt = torch.tensor(x).permute(0, 3, 1, 2)
        ref = f.interpolate(f.adaptive_avg_pool2d(xt, size), size=(h, w), mode="bilinear", align_corners=False)
        coarse, fine = cd.scale_split(x, size)
        np.testing.assert_allclose(coarse, ref.permute(0, 2, 3, 1).numpy(), atol=1e-12)
        np.testing.assert_allclose(coarse + fine, x, atol=1e-12)
    with pytest.raises(ValueError, match=r"`size` must be an integer in \[1, 9\]"):
        cd.scale_split(np.zeros((9, 9, 1)), 10)


def test_coarse_fine_similarity_separates_scales():
    rng = np.random.default_rng(1)
    # a shared coarse part that pooling + upsampling reproduce exactly (a constant per image and channel)
    coarse = 3 * rng.standard_normal((2, 1, 1, 1)) * np.ones((1, 16, 16, 1))
    f1, f2 = (0.3 * rng.standard_normal((2, 16, 16, 1)) for _ in range(2))   # independent fine detail
    cos_c, cos_f = cd.coarse_fine_similarity(coarse + f1, coarse + f2, size=2)
    assert np.all(np.asarray(cos_c) > 0.95) and np.all(np.abs(np.asarray(cos_f)) < 0.3)
    cos_c, cos_f = cd.coarse_fine_similarity(coarse + f1, coarse + f1, size=2)
    np.testing.assert_allclose(cos_c, 1, atol=1e-12)
    np.testing.assert_allclose(cos_f, 1, atol=1e-12)


def _logistic(t, a, b, t0, w):
    return a + b / (1 + np.exp(-(t - t0) / w))


def test_fit_sigmoid_recovers_a_known_midpoint_and_its_bootstrap_interval_covers_it():
    t = np.linspace(0, 50, 26)
    truth = 23.0
    rng = np.random.default_rng(2)
    covered, mids = 0, []
    reps = 20
    for r in range(reps):
        curves = _logistic(t, 0.2, 0.7, truth, -4.0) + 0.08 * rng.standard_normal((24, t.size))  # falling curves, 24 seeds
        fit = cd.fit_sigmoid(t, curves, n_boot=150, key=jax.random.key(r))
        mids.append(fit.midpoint)
        covered += fit.interval[0] <= truth <= fit.interval[1]
        assert fit.boot_failed <= 3 and fit.params[3] < 0
    assert abs(np.mean(mids) - truth) < 0.5
    assert covered >= 16, f"95% intervals covered the midpoint in {covered} of {reps}"  # P(<= 15 | 0.95) ~ 3e-3
    # a median curve that dips before a sharp rise (Protocol I's shape): the rise is found, not a far-off linear fit
    k = np.arange(0, 51, 5.0)
    dip = _logistic(k, 0.78, 0.11, 33.0, 0.5) - 0.05 * np.exp(-((k - 25) / 6) ** 2)
    fit = cd.fit_sigmoid(k, dip[None] + 0.003 * rng.standard_normal((8, k.size)), n_boot=0)
    assert 30 <= fit.midpoint <= 35 and fit.params[3] == pytest.approx(1.25)   # width at its floor, a quarter of the spacing
    with pytest.raises(ValueError, match="`t` must be at least 5 finite, strictly increasing points"):
        cd.fit_sigmoid(t[::-1], curves[:, ::-1])
    with pytest.raises(ValueError, match=r"`curves` must be \(seeds, 26\)"):
        cd.fit_sigmoid(t, curves[:, :5])


def test_dual_gram_modes_equal_the_dense_covariance_eigendecomposition():
    rng = np.random.default_rng(3)
    s, d = 7, 40
    d0 = rng.standard_normal((s, d)) * np.linspace(3, 0.2, d)   # anisotropic differences
    modes = cd.difference_modes(d0)
    cov = d0.T @ d0 / s
    w, v = np.linalg.eigh(cov)
    w, v = w[::-1][:s], v[:, ::-1][:, :s]
    np.testing.assert_allclose(modes.eigenvalues, w, rtol=1e-10)
    overlap = np.abs(np.asarray(modes.basis) @ v)              # unit eigenvectors up to sign
    np.testing.assert_allclose(overlap, np.eye(s), atol=1e-8)
    e0 = cd.mode_energies(d0, modes)                            # at the reference step every mode has energy 1 on average
    np.testing.assert_allclose(np.asarray(e0).mean(0), 1, rtol=1e-10)
    # a later difference that kept only the leading direction: R = trailing / leading band energy << 1
    lead = np.asarray(modes.basis[0])
    d_t = np.outer(rng.standard_normal(s), lead) * np.sqrt(w[0])
    e_t = np.asarray(cd.mode_energies(d_t, modes)).mean(0)
    assert e_t[0] > 0.1 and np.all(e_t[-3:] < 1e-20)
    assert float(cd.band_gap_ratio(e_t, 3)) < 1e-18
    assert float(cd.band_gap_ratio(np.asarray(e0).mean(0), 3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"`n_band` must be a positive integer with 2 n_band <= 7"):
        cd.band_gap_ratio(e_t, 4)
    with pytest.raises(ValueError, match="no difference energy"):
        cd.difference_modes(np.zeros((3, 5)))


def test_sample_replicas_against_per_replica_ddim_steps_and_its_noise_rules():
    model = _random_dit(**{**DIT, "num_classes": 0})
    schedule = cd.VPSchedule.linear(100)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((2, 2, 8, 8, 2)))
    eps = cd.dit_pair_eps(model)
    run = lambda **kw: cd.sample_replicas(eps, schedule, jax.random.key(0), z, num_steps=3, **kw)  # noqa: E731
    # g = 0, eta = 0: each replica is a plain DDIM run of the uncoupled model, stepped here with the public step
    ts = cd.diffusion.samplers.timesteps(100, 3)
    ref = []
    for r in range(2):
        x = z[r]
        for t, tp in zip(ts, list(ts[1:]) + [-1]):
            e = model(x, jnp.full((2,), t, jnp.int32))[..., :2]
            x = cd.ddim_step(schedule, x, e, jnp.full((2,), t), jnp.full((2,), tp))
        ref.append(x)
    out0 = run(g=0.0)
    ref = jnp.stack(ref)  # the schedule is float32: jit and eager round it apart, to ~1e-7 relative
    np.testing.assert_allclose(out0, ref, atol=1e-6 * float(jnp.abs(ref).max()))
    coupled = run(g=0.8)
    assert float(jnp.max(jnp.abs(coupled - out0))) > 1e-4
    np.testing.assert_allclose(run(g=0.8, decouple_at=int(ts[0])), out0, atol=1e-12)   # decoupled from the first step
    # identical starts: shared noise keeps the pair identical while coupled, independent noise separates it
    same = jnp.stack([z[0], z[0]])
    shared = cd.sample_replicas(eps, schedule, jax.random.key(1), same, g=0.5, num_steps=3, eta=1.0, shared_noise=True)
    np.testing.assert_allclose(shared[0], shared[1], atol=1e-12)
    split = cd.sample_replicas(eps, schedule, jax.random.key(1), same, g=0.5, num_steps=3, eta=1.0, shared_noise=True,
                               decouple_at=int(ts[1]))
    assert float(jnp.max(jnp.abs(split[0] - split[1]))) > 1e-3
    with pytest.raises(ValueError, match=r"`decouple_at` must be None or timesteps in \[0, 100\)"):
        run(g=0.5, decouple_at=100)
    # per-pair couplings and intervention steps in one batch equal the runs one by one
    gs, cuts = jnp.array([0.8, 0.3]), jnp.array([int(ts[1]), int(ts[2])])
    np.testing.assert_allclose(run(g=gs, decouple_at=cuts)[:, 0], run(g=0.8, decouple_at=int(ts[1]))[:, 0], atol=1e-12)
    np.testing.assert_allclose(run(g=gs, decouple_at=cuts)[:, 1], run(g=0.3, decouple_at=int(ts[2]))[:, 1], atol=1e-12)
    with pytest.raises(ValueError, match=r"`g` must be a scalar or one value per pair, shape \(2,\)"):
        run(g=jnp.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"`z_pair` must be \(2, B, ...\)"):
        cd.sample_replicas(eps, schedule, jax.random.key(0), z.reshape(4, 8, 8, 2), g=0.5)
    with pytest.raises(ValueError, match="`eta` must be a concrete scalar >= 0"):
        run(g=0.5, eta=-1.0)


def test_protocol_ii_energies_follow_the_hidden_differences_along_the_ddim_trajectory():
    model = _random_dit(**{**DIT, "num_classes": 0})
    schedule = cd.VPSchedule.linear(100)
    z0 = jax.random.normal(jax.random.key(2), (6, 8, 8, 2), jnp.float64)
    z_pair = jnp.stack(cd.replica_init(jax.random.key(3), z0, 0.2))
    pair = cd.dit_pair_eps(model)
    ts = cd.diffusion.samplers.timesteps(100, 4)
    d0 = cd.hidden_differences(pair, z_pair, int(ts[0]), g=0.4)
    assert d0.shape == (2, 6, 16 * 32)
    # against the uncoupled forwards' hidden states at g = 0
    _, h1 = model(z_pair[0], jnp.full((6,), ts[0]), return_hidden=True)
    _, h2 = model(z_pair[1], jnp.full((6,), ts[0]), return_hidden=True)
    # (the DiT's token states are float32: batch sizes round apart by ~1e-6)
    np.testing.assert_allclose(cd.hidden_differences(pair, z_pair, int(ts[0]), g=0.0), (h1 - h2).reshape(2, 6, -1), atol=2e-5)
    modes = cd.block_modes(d0)
    assert modes.basis.shape[0] == 2 and modes.basis.shape[2] == 16 * 32
    e = cd.mode_energy_trajectory(pair, schedule, z_pair, modes, g=0.4, num_steps=4)
    assert e.shape == (4, 2, 6, modes.basis.shape[1])
    np.testing.assert_allclose(np.asarray(e[0]).mean(1), 1.0, rtol=1e-4)   # eq (76) at the reference step
    # step by step by hand: DDIM (eta = 0) of the coupled pair, the energies from each step's differences
    z = z_pair
    for j, (t, tp) in enumerate(zip(ts, list(ts[1:]) + [-1])):
        d = np.asarray(cd.hidden_differences(pair, z, int(t), g=0.4))
        for blk in range(2):
            proj = d[blk] @ np.asarray(modes.basis[blk]).T
            np.testing.assert_allclose(e[j, blk], proj ** 2 / np.asarray(modes.eigenvalues[blk]), rtol=1e-3, atol=1e-5)
        eps_hat = pair(z, jnp.full((6,), t, jnp.int32), 0.4)
        z = jnp.stack([cd.ddim_step(schedule, z[r], eps_hat[r], jnp.full((6,), t), jnp.full((6,), tp)) for r in range(2)])
