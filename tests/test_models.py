"""Flax NNX DiT: published sizes, the fixed embeddings against their formulas, adaLN-Zero, hidden states."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import coupled_diffusion as cd
from coupled_diffusion.models.dit import DIT_CONFIGS, sincos_pos_embed, timestep_embedding


def _count(model, kind=nnx.Param):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind)))


def test_dit_xl2_has_the_published_parameter_count_without_allocating_it():
    model = nnx.eval_shape(lambda: cd.DiT.from_config("DiT-XL/2", input_size=32, in_channels=4, rngs=nnx.Rngs(0)))
    # the reference implementation reports 675,129,632 parameters for DiT-XL/2 (256 x 256 images,
    # 32 x 32 x 4 latents, 1000 classes, learn_sigma); that count includes the fixed 256 x 1152
    # position embedding, which here is a non-trainable variable
    assert _count(model) + 256 * 1152 == 675_129_632
    assert _count(model, nnx.Variable) - _count(model) == 256 * 1152


def test_configs_are_table_1_of_the_paper():
    assert {(c.depth, c.hidden_size, c.num_heads) for c in DIT_CONFIGS.values()} == {
        (12, 384, 6), (12, 768, 12), (24, 1024, 16), (28, 1152, 16)}
    assert len(DIT_CONFIGS) == 12 and {c.patch_size for c in DIT_CONFIGS.values()} == {2, 4, 8}


def test_position_embedding_matches_its_formula_entry_by_entry():
    d, g = 16, 3
    emb = sincos_pos_embed(d, g)
    q = d // 4
    for row in range(g):
        for col in range(g):
            tok = row * g + col
            for k in range(q):
                w = 10000.0 ** (-k / q)
                expect = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
                got = [emb[tok, k], emb[tok, q + k], emb[tok, 2 * q + k], emb[tok, 3 * q + k]]
                np.testing.assert_allclose(got, expect, atol=1e-6)


def test_timestep_embedding_matches_its_formula():
    e = np.asarray(timestep_embedding(jnp.array([0.0, 7.5]), 8))
    for i, t in enumerate((0.0, 7.5)):
        for k in range(4):
            w = math.exp(-math.log(10000.0) * k / 4)
            np.testing.assert_allclose([e[i, k], e[i, 4 + k]], [math.cos(t * w), math.sin(t * w)], atol=1e-6)


def _randomised(model, key):
    """Every parameter replaced by a random draw (a fresh DiT is zero-output by design)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def test_fresh_dit_outputs_zeros_and_hidden_states_do_not_change_the_output():
    model = cd.DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=3, num_heads=4, num_classes=10,
                   rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t, y = jnp.array([3.0, 500.0]), jnp.array([1, 7])
    run = nnx.jit(lambda m, x, t, y: m(x, t, y))  # jitted: eager op-by-op dispatch is slow on this CPU
    out = run(model, x, t, y)
    assert out.shape == (2, 16, 16, 6) and float(jnp.abs(out).max()) == 0.0  # adaLN-Zero, zero final layer
    model = _randomised(model, jax.random.key(2))
    out = run(model, x, t, y)
    out2, hidden = nnx.jit(lambda m, x, t, y: m(x, t, y, return_hidden=True))(model, x, t, y)
    np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-7)
    assert hidden.shape == (3, 2, 16, 64) and float(jnp.abs(out).max()) > 0
    # labels matter; force_drop swaps in the null class
    assert not np.allclose(run(model, x, t, jnp.array([2, 7]))[0], out[0])
    dropped = nnx.jit(lambda m, x, t, y, d: m(x, t, y, force_drop=d))(model, x, t, y, jnp.array([True, False]))
    assert not np.allclose(dropped[0], out[0]) and np.allclose(dropped[1], out[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dropped[0], run(model, x, t, jnp.array([10, 7]))[0], rtol=1e-6, atol=1e-7)


def test_unpatchify_inverts_patchify():
    model = cd.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0,
                   learn_sigma=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    # token (r, c) holds the p x p x C patch at rows 2r:2r+2, cols 2c:2c+2, flattened (p, q, C)
    tokens = x.reshape(2, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 12)
    np.testing.assert_array_equal(model.unpatchify(tokens), x)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    f32 = _randomised(cd.DiT(**kw, rngs=nnx.Rngs(0)), jax.random.key(3))
    bf16 = cd.DiT(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x = jax.random.normal(jax.random.key(4), (3, 8, 8, 4))
    t, y = jnp.array([1.0, 10.0, 100.0]), jnp.array([0, 1, 4])
    run = nnx.jit(lambda m, x, t, y: m(x, t, y))
    a, b = run(f32, x, t, y), run(bf16, x, t, y)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.03


def _dots(jaxpr):
    """Every dot_general in a closed jaxpr, nested calls included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _dots(sub)


@pytest.mark.parametrize("replica_g", [None, 0.5])
def test_bfloat16_products_accumulate_in_float32(replica_g):
    # bfloat16 operands, float32 accumulation and result: the form XLA:CPU runs on AMX tiles and the
    # more accurate one; a bfloat16-result product anywhere in the forward would fail here
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    model = cd.DiT(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x, t, y = jnp.zeros((4, 8, 8, 4)), jnp.ones(4), jnp.zeros(4, int)
    jaxpr = jax.make_jaxpr(lambda x: model(x, t, y, replica_g=replica_g))(x).jaxpr
    low = [e for e in _dots(jaxpr) if e.invars[0].aval.dtype == jnp.bfloat16]
    assert len(low) >= 2 * (6 + (2 if replica_g is None else 4))  # per block: q, k, v, proj, fc1, fc2; attention 2 or 4
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in low), [str(e.outvars[0].aval) for e in low]


def test_dit_errors():
    with pytest.raises(ValueError, match="Unknown DiT config"):
        cd.DiT.from_config("DiT-M/2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        cd.DiT(input_size=9, patch_size=2, hidden_size=32, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    model = cd.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=4,
                   rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels last"):
        model(jnp.zeros((1, 3, 8, 8)), jnp.zeros(1), jnp.zeros(1, int))
    with pytest.raises(ValueError, match="labels"):
        model(jnp.zeros((1, 8, 8, 3)), jnp.zeros(1))


def test_data_parallel_and_fsdp_forward_and_gradient_equal_unsharded_on_4_fake_devices():
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import coupled_diffusion as cd
        from coupled_diffusion.models.sharding import data_mesh, replicate, shard_batch
        assert len(jax.devices()) == 4
        kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
        def build():
            m = cd.DiT(**kw, rngs=nnx.Rngs(0))
            g, p, rest = nnx.split(m, nnx.Param, ...)
            leaves, tree = jax.tree.flatten(p)
            keys = jax.random.split(jax.random.key(1), len(leaves))
            return nnx.merge(g, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]), rest)
        x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3)); t = jnp.arange(8.0) * 10; y = jnp.arange(8) % 5
        def loss(model, x, t, y):
            return jnp.mean((model(x, t, y) - 0.1) ** 2)
        step = nnx.jit(nnx.value_and_grad(loss))
        ref_loss, ref_grad = step(build(), x, t, y)
        mesh = data_mesh()
        model = replicate(build(), mesh)
        xs, ts, ys = shard_batch((x, t, y), mesh)
        assert len(xs.sharding.device_set) == 4 and xs.addressable_shards[0].data.shape[0] == 2
        out_loss, out_grad = step(model, xs, ts, ys)
        np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(out_grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        # FSDP: the same weights, but each weight matrix split over the devices along its model-width axis
        with jax.set_mesh(mesh):
            fsdp = cd.DiT(**kw, fsdp_axis="data", rngs=nnx.Rngs(0))
        ref = dict(nnx.to_flat_state(nnx.state(build(), nnx.Param)))
        flat = [(path, var.replace(jax.device_put(ref[path].get_value(), var.get_value().sharding)))
                for path, var in nnx.to_flat_state(nnx.state(fsdp, nnx.Param))]
        nnx.update(fsdp, nnx.from_flat_state(flat))
        fc1 = fsdp.blocks[0].mlp.fc1.kernel[...]
        assert fc1.shape == (32, 128) and fc1.addressable_shards[0].data.shape == (32, 32), fc1.sharding
        assert fsdp.final_layer.linear.kernel[...].addressable_shards[0].data.shape == (8, 24)
        assert fsdp.blocks[0].mlp.fc1.bias[...].addressable_shards[0].data.shape == (128,)
        f_loss, f_grad = step(fsdp, xs, ts, ys)
        np.testing.assert_allclose(f_loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(f_grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        try:
            shard_batch(jnp.zeros((6, 2)), mesh)
            raise SystemExit("no error for an indivisible batch")
        except ValueError as e:
            assert "multiple of the device count" in str(e)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_unet_shapes_at_28_32_64_and_the_paper_layout():
    """28 -> 14 -> 7 (the paper's MNIST size), and 32 / 64 with deeper stacks; shapes by abstract evaluation."""
    from coupled_diffusion.models.unet import UNet

    for size, widths in [(28, (32, 64, 64)), (32, (16, 32, 32, 32)), (64, (16, 32, 32, 64, 64))]:
        model = nnx.eval_shape(lambda w=widths: UNet(in_channels=2, block_channels=w, rngs=nnx.Rngs(0)))
        out = nnx.eval_shape(lambda m, x, t: m(x, t), model, jax.ShapeDtypeStruct((4, size, size, 2), jnp.float32),
                             jax.ShapeDtypeStruct((4,), jnp.int32))
        assert out.shape == (4, size, size, 2) and out.dtype == jnp.float32
    # the paper-size model: resolutions visited and skip connections are those of a 3-level U-Net
    model = nnx.eval_shape(lambda: UNet(in_channels=2, rngs=nnx.Rngs(0)))
    assert [len(level.resnets) for level in model.down_blocks] == [1, 1, 1]
    assert [len(level.resnets) for level in model.up_blocks] == [2, 2, 2]
    assert model.down_blocks[2].attentions is not None and model.down_blocks[0].attentions is None


def test_unet_bfloat16_and_errors():
    from coupled_diffusion.models.unet import UNet

    kw = dict(in_channels=2, block_channels=(8, 16), num_groups=4, attention_head_dim=4)
    rng = np.random.default_rng(0)  # random weights without per-shape initialiser compiles (slow on this CPU)
    f32 = nnx.eval_shape(lambda: UNet(**kw, rngs=nnx.Rngs(0)))
    nnx.update(f32, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), nnx.state(f32)))
    bf16 = nnx.eval_shape(lambda: UNet(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    nnx.update(bf16, nnx.state(f32))  # the same float32 parameters, bfloat16 compute
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 2)), jnp.array([3, 700])
    run = nnx.jit(lambda m, x, t: m(x, t))
    a, b = run(f32, x, t), run(bf16, x, t)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.03
    with pytest.raises(ValueError, match="divisible by 2"):
        f32(jnp.zeros((1, 7, 7, 2)), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"\(B, H, W, 2\)"):
        f32(jnp.zeros((1, 2, 8, 8)), jnp.zeros(1))
    with pytest.raises(ValueError, match="num_groups"):
        UNet(in_channels=2, block_channels=(12, 16), num_groups=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="one flag per level"):
        UNet(in_channels=2, block_channels=(8, 16), attention=(True,), num_groups=4, rngs=nnx.Rngs(0))


def _group_norm_reference(x, scale, bias, groups, eps):
    """Two-pass group norm, written out independently, for autodiff to differentiate."""
    b, c = x.shape[0], x.shape[-1]
    xr = x.reshape(b, -1, groups, c // groups)
    mean = xr.mean((1, 3), keepdims=True)
    var = jnp.square(xr - mean).mean((1, 3), keepdims=True)
    return ((xr - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape, groups, silu", [((4, 5, 6, 12), 3, False), ((3, 7, 8), 8, True), ((2, 3, 3, 4), 1, True)])
def test_group_norm_and_its_hand_written_backward_match_autodiff_of_a_reference(shape, groups, silu):
    # float64: the XLA form (the CPU extension's fused kernel is float32 only, tested in test_onednn)
    from jax.test_util import check_grads

    from coupled_diffusion.models.unet import group_norm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5)
    scale, bias = (jnp.asarray(rng.standard_normal(shape[-1])) for _ in range(2))
    shift = jnp.asarray(rng.standard_normal((shape[0], shape[-1])))  # per sample and channel, before the norm
    expand = lambda sh: sh.reshape((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))  # noqa: E731
    ours = lambda x, s, b, sh: group_norm(x, s, b, groups, 1e-5, shift=sh, silu=silu)  # noqa: E731

    def ref(x, s, b, sh):
        y = _group_norm_reference(x + expand(sh), s, b, groups, 1e-5)
        return y * jax.nn.sigmoid(y) if silu else y

    np.testing.assert_allclose(ours(x, scale, bias, shift), ref(x, scale, bias, shift), atol=1e-12)
    w = jnp.asarray(rng.standard_normal(shape))
    g_ours = jax.grad(lambda *a: (ours(*a) * w).sum(), argnums=(0, 1, 2, 3))(x, scale, bias, shift)
    g_ref = jax.grad(lambda *a: (ref(*a) * w).sum(), argnums=(0, 1, 2, 3))(x, scale, bias, shift)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-11)
    check_grads(ours, (x, scale, bias, shift), order=1, modes=["rev"])  # and against finite differences


def test_attention_xla_form_and_its_backward_match_a_written_out_reference():
    # float64: the XLA form and the hand-written backward (log-sum-exp rebuilt probabilities)
    from jax.test_util import check_grads

    from coupled_diffusion.models.unet import attention

    b, p, c, heads = 2, 10, 12, 3
    qkv = jnp.asarray(np.random.default_rng(3).standard_normal((b, p, 3 * c)) * 2)
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, p, heads, c // heads) for i in range(3))
    # written out (jax.nn.dot_product_attention takes its softmax in float32 even for float64 inputs)
    prob = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // heads), axis=-1)
    np.testing.assert_allclose(attention(qkv, heads), jnp.einsum("bhqk,bkhd->bqhd", prob, v).reshape(b, p, c), atol=1e-12)
    check_grads(lambda a: attention(a, heads), (qkv,), order=1, modes=["rev"])


def test_sub_pixel_upsample_conv_equals_nearest_upsampling_then_the_conv():
    from coupled_diffusion.models.unet import _conv, upsample_conv

    conv = _conv(5, 7, dtype=None, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    conv.bias.set_value(jnp.asarray(np.random.default_rng(1).standard_normal(7)))
    h = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 6, 5)))
    plain = lambda h, k, b: jax.lax.conv_general_dilated(
        jnp.repeat(jnp.repeat(h, 2, 1), 2, 2), k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    k, b = conv.kernel.get_value(), conv.bias.get_value()
    np.testing.assert_allclose(upsample_conv(h, conv), plain(h, k, b), atol=1e-12)
    assert upsample_conv(h, conv).shape == (3, 8, 12, 7)

    def ours(h, k, b):  # the parameters as traced values, through a stand-in with the conv's interface
        param = lambda v: types.SimpleNamespace(get_value=lambda: v)
        return upsample_conv(h, types.SimpleNamespace(kernel=param(k), bias=param(b), dtype=None))

    w = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 12, 7)))
    for argnum in range(3):
        g_ours = jax.grad(lambda *a: (ours(*a) * w).sum(), argnums=argnum)(h, k, b)
        g_plain = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=argnum)(h, k, b)
        np.testing.assert_allclose(g_ours, g_plain, atol=1e-11)


def test_unet_weight_init_draws_the_values_of_flax_variance_scaling():
    # the U-Net draws its kernels flat and reshapes them (a fast compile); the values must be
    # those of the library initializer it stands for, PyTorch's U(+-1/sqrt(fan_in))
    from coupled_diffusion.models.unet import _torch_uniform

    reference = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    key = jax.random.key(5)
    # (the reference's own 4-D draws take about a second each to compile: few cases)
    for shape, dtype in [((3, 3, 8, 16), jnp.float32), ((3, 3, 2, 32), jnp.bfloat16), ((16, 32), jnp.float64),
                         ((1, 1, 4, 8), jnp.float32)]:
        ours, theirs = _torch_uniform(key, shape, dtype), reference(key, shape, dtype)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(np.asarray(ours, np.float64), np.asarray(theirs, np.float64))
    limit = 1 / np.sqrt(3 * 3 * 8)
    w = np.asarray(_torch_uniform(key, (3, 3, 8, 4096)))
    assert -limit <= w.min() < -0.99 * limit and 0.99 * limit < w.max() <= limit
    with pytest.raises(ValueError, match="at least 2 axes"):
        _torch_uniform(key, (7,))
