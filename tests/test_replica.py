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


DIT = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3, num_heads=4, num_classes=5)


def test_coupled_dit_at_g0_is_two_uncoupled_forwards_and_couples_otherwise():
    model = _random_dit(**DIT)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 2)))
    t, y = jnp.array([10.0, 400.0, 900.0]), jnp.array([0, 3, 4])
    out0, hidden0 = cd.coupled_dit(model, x, t, y, g=0.0, return_hidden=True)
    assert out0.shape == (2, 3, 8, 8, 4) and hidden0.shape == (3, 2, 3, 16, 32)
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
    _, hidden_last = cd.coupled_dit(model, x, t, y, g=0.7, blocks=[2], return_hidden=True)
    np.testing.assert_allclose(hidden_last[:2], hidden0[:2], atol=1e-12)
    assert float(jnp.max(jnp.abs(hidden_last[2] - hidden0[2]))) > 1e-3
    with pytest.raises(ValueError, match=r"`blocks` must be block indices in \[0, 3\)"):
        cd.coupled_dit(model, x, t, y, g=0.5, blocks=[3])
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
