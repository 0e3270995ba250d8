"""Discrete VP diffusion with mode-shaped noise: diffusers parity, Monte Carlo laws, the samplers' options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import coupled_diffusion as cd
from coupled_diffusion.diffusion.samplers import ddim_step, ddpm_step, timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _nhwc(t):
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("kind, peer_kind", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedule_arrays_equal_diffusers(kind, peer_kind):
    T = 200
    ours = cd.VPSchedule.named(kind, T)
    scaled = dict(beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T) if kind == "linear" else {}  # see below
    peer = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=peer_kind, **scaled)
    np.testing.assert_allclose(ours.betas, peer.betas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod, peer.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    var = np.array([float(peer._get_variance(t)) for t in range(1, T)])
    np.testing.assert_allclose(ours.posterior_variance()[1:], var, rtol=1e-4, atol=1e-9)  # float32 rounding


@pytest.mark.parametrize("num_steps", [None, 50])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_step_equals_diffusers_at_g0(num_steps, clip):
    T = 1000
    sched = cd.VPSchedule.linear(T)
    peer = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    if num_steps:
        peer.set_timesteps(num_steps)
    ts = timesteps(T, num_steps)
    np.testing.assert_array_equal(ts, peer.timesteps.numpy())
    gen = torch.Generator().manual_seed(0)
    for i in (0, len(ts) // 2, len(ts) - 1):  # a noisy step, a middle one, the last (t = 0 or the last grid point)
        t, tp = int(ts[i]), int(ts[i + 1]) if i + 1 < len(ts) else -1
        x = torch.randn(3, 2, 8, 8, generator=gen)
        eps = torch.randn(3, 2, 8, 8, generator=gen)
        ref = peer.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        draw = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(7))  # diffusers' own draw
        ours = ddpm_step(sched, _nhwc(x), _nhwc(eps), jnp.int32(t), jnp.int32(tp), _nhwc(draw), clip=clip)
        np.testing.assert_allclose(ours, _nhwc(ref), rtol=0, atol=1e-6 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_and_timesteps_equal_diffusers_at_g0(eta):
    T, n = 1000, 50
    sched = cd.VPSchedule.linear(T)
    peer = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    peer.set_timesteps(n)
    ts = timesteps(T, n)
    np.testing.assert_array_equal(ts, peer.timesteps.numpy())
    gen = torch.Generator().manual_seed(1)
    for i in (0, n // 2, n - 1):
        t, tp = int(ts[i]), int(ts[i + 1]) if i + 1 < n else -1
        x, eps, vn = (torch.randn(2, 2, 6, 6, generator=gen) for _ in range(3))
        ref = peer.step(eps, t, x, eta=eta, variance_noise=vn if eta else None).prev_sample
        ours = ddim_step(sched, _nhwc(x), _nhwc(eps), jnp.int32(t), jnp.int32(tp), _nhwc(vn), eta=eta)
        np.testing.assert_allclose(ours, _nhwc(ref), rtol=0, atol=1e-6 * max(1.0, float(ref.abs().max())))


def test_paired_noise_has_the_law_of_eq_92_93():
    g, n = 0.6, 400_000
    noise = cd.ModeNoise.paired(g)
    e = np.asarray(noise.sample(jax.random.key(0), (n, 2)), np.float64)
    cov = e.T @ e / n
    se = np.sqrt((1 + g**2) / n)  # sd of a covariance estimate of two unit-variance normals
    np.testing.assert_allclose(cov, [[1, -g], [-g, 1]], atol=5 * se * 1.5)
    u, v = (e[:, 0] + e[:, 1]) / np.sqrt(2), (e[:, 0] - e[:, 1]) / np.sqrt(2)  # eq 91, by hand
    np.testing.assert_allclose([u.var(), v.var(), np.mean(u * v)], [1 - g, 1 + g, 0], atol=5 * np.sqrt(2 / n) * 1.6)
    np.testing.assert_allclose(np.asarray(noise.to_modes(jnp.asarray(e[:5], jnp.float32))),
                               np.stack([u[:5], v[:5]], -1), atol=1e-5)
    y = np.asarray(noise.whiten(jnp.asarray(e, jnp.float32)), np.float64)
    np.testing.assert_allclose(y.T @ y / n, np.eye(2), atol=0.01)
    np.testing.assert_allclose(np.asarray(noise.covariance), [[1, -g], [-g, 1]], atol=1e-6)


def test_noise_from_covariance_three_channels():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 3))
    cov = a @ a.T + 0.5 * np.eye(3)
    noise = cd.ModeNoise.from_covariance(cov)
    e = np.asarray(noise.sample(jax.random.key(1), (300_000, 3)), np.float64)
    np.testing.assert_allclose(e.T @ e / len(e), cov, atol=0.03 * np.abs(cov).max())
    z = jnp.asarray(rng.standard_normal((4, 5, 3)), jnp.float32)
    np.testing.assert_allclose(noise.color(noise.whiten(z)), z, atol=1e-5)


@pytest.mark.parametrize("g", [1.0, -1.0, 1.5, float("nan")])
def test_invalid_coupling_is_a_clear_error(g):
    with pytest.raises(ValueError, match="`g`.*\\|g\\| < 1"):
        cd.ModeNoise.paired(g)


def test_invalid_coupling_under_jit_is_a_runtime_error():
    f = jax.jit(lambda g: cd.ModeNoise.paired(g).variances)
    np.testing.assert_allclose(f(0.3), [0.7, 1.3], rtol=1e-6)
    with pytest.raises(Exception, match="g"):
        f(1.2).block_until_ready()


def test_linear_schedule_scales_with_T_and_ends_at_noise():
    # Nichol & Dhariwal's rule (improved-diffusion `get_named_beta_schedule("linear")`): scale = 1000 / T
    for T in (50, 200, 500):
        ours = cd.VPSchedule.linear(T)
        peer = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
        np.testing.assert_allclose(ours.alphas_cumprod, peer.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
        # the continuous-time VP SDE with beta(s) from 0.1 to 20 leaves exp(-(0.1 + 20) / 4) = 0.0066 of the signal
        assert ours.terminal_signal < np.exp(-(0.1 + 20) / 4)
    # the unscaled DDPM end points at T = 200 leave 37% of the signal (why they are not the default)
    with pytest.warns(UserWarning, match=r"terminal_signal = sqrt\(alpha_bar\[T-1\]\) = 0\.3"):  # and say so when built
        unscaled = cd.VPSchedule.linear(200, 1e-4, 0.02)
    assert abs(unscaled.terminal_signal - np.exp(-(200 * 0.01005) / 2)) < 0.01


def test_schedule_errors():
    with pytest.raises(ValueError, match="`T`"):
        cd.VPSchedule.linear(1)
    with pytest.raises(ValueError, match="beta_start"):
        cd.VPSchedule.linear(10, 0.1, 0.01)
    with pytest.raises(ValueError, match="'linear' or 'cosine'"):
        cd.VPSchedule.named("sigmoid", 10)
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(100, 0)


def _gaussian_eps_fn(schedule, noise, m, S):
    """The exact eps prediction E[eps | z_t] for data z0 ~ N(m, S) per pixel (channel covariance S), noise law Sigma."""
    Sigma = noise.covariance

    def eps_fn(z, t):
        ab = schedule.alphas_cumprod[t][:, None, None, None]
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        cz = a[..., None] ** 2 * S + b[..., None] ** 2 * Sigma  # (B,1,1,k,k)
        r = jnp.linalg.solve(cz, (z - a * m)[..., None])[..., 0]
        return b * (r @ Sigma.T)

    return eps_fn


@pytest.mark.parametrize("method, num_steps", [("ddpm", None), ("ddim", 100)])
def test_samplers_with_the_exact_eps_draw_the_data_law_under_mode_shaped_noise(method, num_steps):
    """With the exact eps of Gaussian data, DDPM (ancestral, mode-shaped reverse noise, eq 102) and DDIM
    (eta = 0, the probability flow) both return the data law: mean and channel covariance within Monte
    Carlo error. The reverse noise must be mode-shaped: with isotropic reverse noise DDPM misses S."""
    g, n = 0.6, 6000
    sched, noise = cd.VPSchedule.linear(1000), cd.ModeNoise.paired(g)
    m = jnp.array([0.5, -0.2])
    S = jnp.array([[0.30, 0.25], [0.25, 0.40]])
    eps_fn = _gaussian_eps_fn(sched, noise, m, S)
    zT = noise.sample(jax.random.key(0), (n, 1, 1, 2))
    out = cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, method=method, num_steps=num_steps).z0
    x = np.asarray(out, np.float64).reshape(n, 2)
    se = np.sqrt(np.diag(S) / n)
    assert np.all(np.abs(x.mean(0) - np.asarray(m)) < 5 * se)
    c = np.cov(x.T)
    assert np.all(np.abs(c - np.asarray(S)) < 0.03), c
    if method == "ddpm":
        iso = cd.ModeNoise.isotropic(2)
        bad = cd.sample(eps_fn, sched, iso, jax.random.key(1), zT, method="ddpm").z0  # wrong reverse law
        assert np.max(np.abs(np.cov(np.asarray(bad).reshape(n, 2).T) - np.asarray(S))) > 0.05


def test_logging_restart_and_clones():
    g = 0.4
    sched, noise = cd.VPSchedule.linear(200), cd.ModeNoise.paired(g)
    eps_fn = _gaussian_eps_fn(sched, noise, jnp.array([0.3, 0.1]), jnp.array([[0.2, 0.05], [0.05, 0.3]]))
    zT = noise.sample(jax.random.key(0), (4, 3, 3, 2))
    log_at = (150, 60, 10)
    full = cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, method="ddim", log_at=log_at)
    assert full.x0_log.shape == (3, 4, 3, 3, 2) and full.z_log.shape == (3, 4, 3, 3, 2)
    # x0-hat is eq (97) of the logged state and the exact eps there
    t = jnp.full((4,), 60)
    np.testing.assert_allclose(full.x0_log[1], cd.predict_x0(sched, full.z_log[1], eps_fn(full.z_log[1], t), t), atol=1e-5)
    # restarting the deterministic sampler from a logged state reproduces the end state
    again = cd.sample(eps_fn, sched, noise, jax.random.key(9), full.z_log[1], method="ddim", start_t=jnp.int32(60))
    np.testing.assert_allclose(again.z0, full.z0, atol=1e-5)
    # DDPM clones from one cached state: same key -> same sample; different keys -> different ones
    master = cd.sample(eps_fn, sched, noise, jax.random.key(2), zT, method="ddpm", log_at=log_at)
    c1, c2, c3 = (cd.sample(eps_fn, sched, noise, jax.random.key(k), master.z_log[0], method="ddpm", start_t=150).z0
                  for k in (5, 5, 6))
    np.testing.assert_array_equal(c1, c2)
    assert float(jnp.max(jnp.abs(c1 - c3))) > 1e-3
    with pytest.raises(ValueError, match="log_at"):
        cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, method="ddim", num_steps=50, log_at=(7,))


def test_intervention_moves_only_the_chosen_mode():
    sched, noise = cd.VPSchedule.linear(100), cd.ModeNoise.paired(0.5)
    eps_fn = _gaussian_eps_fn(sched, noise, jnp.zeros(2), 0.3 * jnp.eye(2))
    zT = noise.sample(jax.random.key(0), (64, 4, 4, 2))
    kw = dict(method="ddim", log_at=(40,))
    base = cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, **kw)
    hit = cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, intervention=cd.Intervention(t=40, sigma=0.8, mode=1), **kw)
    d = np.asarray(noise.to_modes(hit.z_log[0] - base.z_log[0]))
    assert np.max(np.abs(d[..., 0])) < 1e-5  # u untouched (eq 101)
    assert abs(d[..., 1].std() - 0.8) < 0.05
    assert float(jnp.max(jnp.abs(hit.z0 - base.z0))) > 0.01
    zero = cd.sample(eps_fn, sched, noise, jax.random.key(1), zT, intervention=cd.Intervention(t=40, sigma=0.0), **kw)
    np.testing.assert_allclose(zero.z0, base.z0, atol=1e-6)


def test_eps_loss_whitening():
    noise = cd.ModeNoise.paired(0.7)
    e = noise.sample(jax.random.key(0), (200_000, 2))
    z = jnp.zeros_like(e)
    assert abs(float(cd.eps_loss(z, e)) - 1.0) < 0.01  # unit channel variances
    assert abs(float(cd.eps_loss(z, e, noise, whitened=True)) - 1.0) < 0.01
    u_only = noise.from_modes(noise.to_modes(e) * jnp.array([1.0, 0.0], jnp.float32))
    # error only in u (variance 1 - g = 0.3): plain mean 0.3 / 2, whitened 1 / 2
    assert abs(float(cd.eps_loss(z, u_only)) - 0.15) < 0.005
    assert abs(float(cd.eps_loss(z, u_only, noise, whitened=True)) - 0.5) < 0.01
