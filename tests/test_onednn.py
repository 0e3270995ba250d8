"""oneDNN convolutions for XLA:CPU (`coupled_diffusion.models.onednn`) against XLA's own in float64."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coupled_diffusion.models import onednn

_HAVE_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++"))
needs_onednn = pytest.mark.skipif(not _HAVE_CXX, reason="no C++ compiler to build the oneDNN extension")
DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, b, strides, padding):
    """XLA's own convolution in float64: an independent implementation, and exact to ~1e-15."""
    x64, w64, b64 = (jnp.asarray(a, jnp.float64) for a in (x, w, b))
    return jax.lax.conv_general_dilated(x64, w64, strides, padding, dimension_numbers=DN) + b64


@needs_onednn
def test_the_test_extra_builds_and_loads_the_extension():
    s = onednn.status()
    assert s["active"], s["reason"]
    assert s["version"].startswith("3.") and os.path.isfile(s["library"])


CASES = [  # (N, H, W, C, O, KH, KW, strides, padding)
    (3, 9, 9, 5, 7, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 8, 6, 4, 6, 3, 3, (2, 2), ((1, 1), (1, 1))),       # the U-Net's down-sampling convolution, non-square
    (2, 7, 7, 3, 4, 2, 2, (1, 1), ((1, 0), (0, 1))),       # a sub-pixel phase of the up-sampling convolution
    (1, 5, 8, 17, 33, 1, 1, (1, 1), ((0, 0), (0, 0))),     # 1x1, channel counts off oneDNN's 16-blocks
    (2, 11, 10, 2, 32, 3, 5, (2, 1), ((2, 0), (1, 3))),    # mixed strides and uneven padding
    (4, 12, 12, 64, 64, 3, 3, (1, 1), ((1, 1), (1, 1))),   # a U-Net width: the blocked brgconv kernels
]


@needs_onednn
@pytest.mark.parametrize("case", CASES)
def test_forward_and_all_three_gradients_match_xla_in_float64(case):
    n, h, w_, c, o, kh, kw, strides, padding = case
    rng = np.random.default_rng(sum(case[:7]))
    x = rng.standard_normal((n, h, w_, c)).astype(np.float32)
    w = (rng.standard_normal((kh, kw, c, o)) / np.sqrt(kh * kw * c)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    f = jax.jit(lambda x, w, b: onednn.conv2d(x, w, b, strides, padding))
    assert "cd_conv2d_fwd" in f.lower(x, w, b).as_text()        # really the oneDNN path
    y = f(x, w, b)
    ref = _reference(x, w, b, strides, padding)
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    ct = rng.standard_normal(ref.shape)
    grads = jax.jit(jax.grad(lambda x, w, b: jnp.sum(onednn.conv2d(x, w, b, strides, padding) * ct.astype(np.float32)),
                             argnums=(0, 1, 2)))(x, w, b)
    refs = jax.grad(lambda x, w, b: jnp.sum(_reference(x, w, b, strides, padding) * ct), argnums=(0, 1, 2))(
        *(a.astype(np.float64) for a in (x, w, b)))
    for name, g, r in zip(("dx", "dw", "db"), grads, refs):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6 * scale, err_msg=name)


@needs_onednn
def test_same_and_valid_padding_none_bias_and_vmap():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 6, 6, 4)).astype(np.float32)   # a vmapped leading axis of 3
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    zero = np.zeros(5)
    same = jax.vmap(lambda x: onednn.conv2d(x, w, padding="SAME"))(x)
    valid = jax.vmap(lambda x: onednn.conv2d(x, w, None, 1, "VALID"))(x)
    for i in range(3):
        np.testing.assert_allclose(same[i], _reference(x[i], w, zero, (1, 1), ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(valid[i], _reference(x[i], w, zero, (1, 1), ((0, 0), (0, 0))), rtol=1e-5, atol=1e-5)


def test_float64_and_bfloat16_take_xla_convolutions():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 4))
    f = jax.jit(lambda x, w: onednn.conv2d(x, w))
    assert "cd_conv2d" not in f.lower(x, w).as_text()
    np.testing.assert_array_equal(f(x, w), _reference(x, w, np.zeros(4), (1, 1), ((1, 1), (1, 1))))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    assert "cd_conv2d" not in f.lower(xb, wb).as_text() and f(xb, wb).dtype == jnp.bfloat16


@needs_onednn
def test_other_platforms_lower_xla_convolutions():
    """The custom calls exist for XLA:CPU only; a GPU or TPU lowering of the same function has none."""
    x, w, b = np.ones((2, 6, 6, 3), np.float32), np.ones((3, 3, 3, 4), np.float32), np.ones(4, np.float32)

    def loss(x, w, b):
        return jnp.sum(onednn.conv2d(x, w, b, 2) ** 2)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    cpu = f.lower(x, w, b).as_text()
    assert all(f"@{t}(" in cpu for t in ("cd_conv2d_fwd", "cd_conv2d_bwd_data", "cd_conv2d_bwd_weights"))
    for platform in ("cuda", "tpu"):
        text = jax.export.export(f, platforms=(platform,))(x, w, b).mlir_module()
        assert "cd_conv2d" not in text and "convolution" in text, platform


@needs_onednn
def test_set_enabled_switches_paths_for_new_traces_and_status_says_so():
    x, w = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)
    previous = onednn.set_enabled(False)
    try:
        assert onednn.status() == {**onednn.status(), "active": False, "reason": "turned off"}
        assert "cd_conv2d" not in jax.jit(lambda x: onednn.conv2d(x, w)).lower(x).as_text()
    finally:
        onednn.set_enabled(previous)
    assert "cd_conv2d" in jax.jit(lambda x: onednn.conv2d(x, w)).lower(x).as_text()


@needs_onednn
def test_enabled_is_scoped_to_its_block_and_thread_and_overrides_the_default():
    x, w = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)

    def uses_onednn():
        return "cd_conv2d" in jax.jit(lambda x: onednn.conv2d(x, w)).lower(x).as_text()

    seen = {}
    with onednn.enabled(False):
        assert not uses_onednn() and onednn.status()["reason"] == "turned off"
        worker = threading.Thread(target=lambda: seen.update(other_thread=uses_onednn()))
        worker.start()
        worker.join()
        with onednn.enabled(True):
            assert uses_onednn()
        assert not uses_onednn()
    assert seen == {"other_thread": True} and uses_onednn()
    previous = onednn.set_enabled(False)
    try:
        with onednn.enabled(True):  # the block wins over the process-wide default
            assert uses_onednn()
        assert not uses_onednn()
    finally:
        onednn.set_enabled(previous)


def test_errors_name_the_parameter():
    x, w = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 5), np.float32)
    with pytest.raises(ValueError, match=r"`kernel` has 3 input channels but `x` has 2"):
        onednn.conv2d(x, np.ones((3, 3, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"`x` must be \(N, H, W, C\)"):
        onednn.conv2d(x[0], w)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(5,\)"):
        onednn.conv2d(x, w, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="`strides` must be a positive int"):
        onednn.conv2d(x, w, strides=0)
    with pytest.raises(ValueError, match="`padding` must be"):
        onednn.conv2d(x, w, padding="FULL")
    with pytest.raises(ValueError, match="`padding` must be"):
        onednn.conv2d(x, w, padding=((1, -1), (1, 1)))
    with pytest.raises(ValueError, match="does not fit the padded input"):
        onednn.conv2d(x, np.ones((7, 7, 2, 5), np.float32), padding="VALID")


def _group_norm_silu_reference(x, scale, bias, shift, groups, silu):
    """Two-pass group norm of x + shift in float64, then SiLU, written out for autodiff."""
    x = x + shift[:, None, :]
    b, p, c = x.shape
    xr = x.reshape(b, p, groups, c // groups)
    mean = xr.mean((1, 3), keepdims=True)
    var = jnp.square(xr - mean).mean((1, 3), keepdims=True)
    y = ((xr - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    return y * jax.nn.sigmoid(y) if silu else y


@needs_onednn
@pytest.mark.parametrize("shape, groups, silu", [((5, 49, 32), 8, True), ((3, 784, 16), 8, False), ((2, 9, 12), 3, True),
                                                ((4, 7, 48), 1, False)])
def test_fused_group_norm_kernel_matches_a_float64_reference_with_gradients(shape, groups, silu):
    from coupled_diffusion.models.unet import group_norm

    rng = np.random.default_rng(shape[1] + groups)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)   # off-centre: E[x^2] - E[x]^2 must stay accurate
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    shift = rng.standard_normal((shape[0], shape[-1])).astype(np.float32) * 2
    w = rng.standard_normal(shape).astype(np.float32)

    def loss(x, scale, bias, shift):
        return jnp.sum(group_norm(x, scale, bias, groups, 1e-5, shift=shift, silu=silu) * w)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    assert "@cd_group_norm_fwd(" in f.lower(x, scale, bias, shift).as_text()
    y = jax.jit(lambda *a: group_norm(*a[:3], groups, 1e-5, shift=a[3], silu=silu))(x, scale, bias, shift)
    args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, shift)]
    ref = _group_norm_silu_reference(*args64, groups, silu)
    np.testing.assert_allclose(y, ref, atol=2e-5 * float(jnp.abs(ref).max()))
    _, grads = f(x, scale, bias, shift)
    ref_grads = jax.grad(lambda *a: jnp.sum(_group_norm_silu_reference(*a, groups, silu) * w), argnums=(0, 1, 2, 3))(*args64)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))


def _attention_reference(qkv, heads):
    b, p, c3 = qkv.shape
    c = c3 // 3
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, p, heads, c // heads) for i in range(3))
    prob = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // heads), axis=-1)  # float64 throughout
    return jnp.einsum("bhqk,bkhd->bqhd", prob, v).reshape(b, p, c)


@needs_onednn
@pytest.mark.parametrize("batch, positions, width, heads", [(4, 49, 32, 4), (2, 196, 64, 2), (3, 5, 24, 3)])
def test_fused_attention_kernel_matches_a_float64_reference_with_gradients(batch, positions, width, heads):
    from coupled_diffusion.models.unet import attention

    rng = np.random.default_rng(positions)
    qkv = (rng.standard_normal((batch, positions, 3 * width)) * 2).astype(np.float32)  # peaked softmax rows
    w = rng.standard_normal((batch, positions, width)).astype(np.float32)
    f = jax.jit(jax.value_and_grad(lambda a: jnp.sum(attention(a, heads) * w)))
    assert "@cd_attention_fwd(" in f.lower(qkv).as_text()
    qkv64 = jnp.asarray(qkv, jnp.float64)
    ref = _attention_reference(qkv64, heads)
    np.testing.assert_allclose(jax.jit(lambda a: attention(a, heads))(qkv), ref, atol=1e-5 * float(jnp.abs(ref).max()))
    ref_grad = jax.grad(lambda a: jnp.sum(_attention_reference(a, heads) * w))(qkv64)
    np.testing.assert_allclose(f(qkv)[1], ref_grad, atol=2e-5 * float(jnp.abs(ref_grad).max()))


def test_fused_group_norm_and_attention_errors_name_the_parameter():
    from coupled_diffusion.models.unet import attention, group_norm

    x, c = np.ones((2, 9, 12), np.float32), np.ones(12, np.float32)
    with pytest.raises(ValueError, match=r"`groups` \(5\) must divide the 12 channels"):
        group_norm(x, c, c, 5, 1e-5)
    with pytest.raises(ValueError, match=r"`shift` must have shape \(batch, channels\) = \(2, 12\)"):
        group_norm(x, c, c, 3, 1e-5, shift=np.ones((12,), np.float32))
    with pytest.raises(ValueError, match=r"`qkv` must be \(batch, positions, 3 x heads x head_dim\) with heads = 4"):
        attention(np.ones((2, 9, 30), np.float32), 4)
    with pytest.raises(ValueError, match=r"`qkv` must be"):
        attention(np.ones((2, 9, 31), np.float32), 1)


def test_other_platforms_lower_no_fused_kernels():
    from coupled_diffusion.models.unet import attention, group_norm

    x, c, qkv = np.ones((2, 9, 12), np.float32), np.ones(12, np.float32), np.ones((2, 9, 24), np.float32)
    f = jax.jit(jax.grad(lambda x, qkv: jnp.sum(group_norm(x, c, c, 3, 1e-5, silu=True)) + jnp.sum(attention(qkv, 2) ** 2),
                         argnums=(0, 1)))
    for platform in ("cuda", "tpu"):
        text = jax.export.export(f, platforms=(platform,))(x, qkv).mlir_module()
        assert "cd_group_norm" not in text and "cd_attention" not in text, platform


@needs_onednn
def test_unet_uses_onednn_and_matches_its_xla_form_with_gradients():
    from coupled_diffusion.models.unet import UNet

    model = UNet(in_channels=2, block_channels=(16, 32), attention=(False, True), num_groups=4, attention_head_dim=8,
                 rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 12, 12, 2)).astype(np.float32)
    t = np.array([3.0, 50.0, 400.0], np.float32)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x, t) ** 2)

    fast = jax.jit(jax.value_and_grad(loss))
    text = fast.lower(params).as_text()
    assert text.count("@cd_conv2d_fwd(") >= 8, "the U-Net's convolutions should be oneDNN custom calls"
    assert text.count("@cd_group_norm_fwd(") >= 8 and text.count("@cd_attention_fwd(") >= 1, "and its norms and attention"
    l1, g1 = fast(params)
    previous = onednn.set_enabled(False)
    try:
        slow = jax.jit(jax.value_and_grad(loss))
        assert "cd_conv2d" not in slow.lower(params).as_text()
        l2, g2 = slow(params)
    finally:
        onednn.set_enabled(previous)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-9)


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=300)


@needs_onednn
def test_the_extension_is_built_once_into_the_cache_and_reused(tmp_path):
    code = """
        import os, numpy as np
        from coupled_diffusion.models import onednn
        s = onednn.status()
        assert s["active"], s
        print(s["library"], os.stat(s["library"]).st_mtime_ns)
        y = onednn.conv2d(np.ones((1, 3, 3, 1), np.float32), np.ones((3, 3, 1, 1), np.float32))
        print(float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0]))
    """
    first = _fresh(code, COUPLED_DIFFUSION_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    second = _fresh(code, COUPLED_DIFFUSION_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr[-2000:]
    lines1, lines2 = first.stdout.split("\n"), second.stdout.split("\n")
    assert lines1[0] == lines2[0] and lines1[0].startswith(str(tmp_path))      # same file, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(lines1[0].split()[0])]  # no temporaries left
    assert lines1[1] == "9.0 4.0"                                                   # all-ones 3x3 on 3x3, zero padded


def test_without_onednn_it_says_why_and_falls_back(tmp_path):
    code = """
        import numpy as np, jax
        from coupled_diffusion.models import onednn
        s = onednn.status()
        assert not s["active"], s
        print(s["reason"])
        f = jax.jit(lambda x, w: onednn.conv2d(x, w))
        x, w = np.ones((1, 3, 3, 1), np.float32), np.ones((3, 3, 1, 1), np.float32)
        assert "cd_conv2d" not in f.lower(x, w).as_text()
        print(float(f(x, w)[0, 1, 1, 0]))
    """
    empty = _fresh(code, COUPLED_DIFFUSION_ONEDNN_ROOT=str(tmp_path), COUPLED_DIFFUSION_CACHE=str(tmp_path / "cache"))
    assert empty.returncode == 0, empty.stderr[-2000:]
    assert "has no include/oneapi/dnnl/dnnl.hpp" in empty.stdout and empty.stdout.split("\n")[1] == "9.0"
    off = _fresh(code, COUPLED_DIFFUSION_ONEDNN="0")
    assert off.returncode == 0 and off.stdout.startswith("turned off"), off.stderr[-2000:]


def test_importing_the_package_builds_nothing():
    code = """
        import coupled_diffusion, coupled_diffusion.models.onednn as o
        assert o._state["loaded"] is None, o._state
        print("ok")
    """
    proc = _fresh(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_several_cpu_devices_keep_xla_convolutions_so_a_split_batch_stays_split():
    code = """
        import jax, numpy as np
        from coupled_diffusion.models import onednn
        assert len(jax.devices()) == 4
        f = jax.jit(lambda x, w: onednn.conv2d(x, w))
        x, w = np.ones((4, 5, 5, 2), np.float32), np.ones((3, 3, 2, 3), np.float32)
        assert "cd_conv2d" not in f.lower(x, w).as_text()
        print(float(f(x, w)[0, 2, 2, 0]))
    """
    proc = _fresh(code, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert proc.returncode == 0 and proc.stdout.strip() == "18.0", proc.stderr[-2000:]


@needs_onednn
def test_explicitly_sharded_operands_keep_xla_convolutions():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(3)
    x = jax.device_put(rng.standard_normal((2, 5, 5, 2)).astype(np.float32), NamedSharding(mesh, P("data")))
    w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    with jax.set_mesh(mesh):
        f = jax.jit(lambda x, w: onednn.conv2d(x, w))
        assert "cd_conv2d" not in f.lower(x, w).as_text()
        y = f(x, w)
    np.testing.assert_allclose(y, _reference(np.asarray(x), w, np.zeros(3), (1, 1), ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)
