"""Sweeps: labelled results, chunking, and sharding over 4 fake CPU devices equal to the unsharded run."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import coupled_diffusion as cd


def _ts(g, theta):
    return cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, theta),
                              throw=False).value


def test_sweep_matches_a_python_loop_and_is_labelled():
    g, th = jnp.linspace(0.0, 2.0, 7), jnp.linspace(0.0, np.pi, 5)
    res = cd.sweep(_ts, g=g, theta=th, chunk_size=4)  # 35 points in 9 chunks: padding exercised
    assert res.values.shape == (7, 5) and res.dims == ("g", "theta")
    loop = np.array([[float(_ts(a, b)) for b in th] for a in g])
    np.testing.assert_array_equal(np.isnan(res.values), np.isnan(loop))
    np.testing.assert_allclose(res.values, loop, rtol=1e-12)
    np.testing.assert_allclose(res.sel(g=1.0).values, loop[3])
    both = cd.sweep(lambda a, b: {"sum": a + b, "vec": jnp.stack([a, b])}, a=jnp.arange(3.0), b=jnp.arange(2.0))
    assert both.values["vec"].shape == (3, 2, 2) and both.values["sum"][2, 1] == 3.0


def test_bad_sweep_inputs_raise():
    with pytest.raises(ValueError, match="axis"):
        cd.sweep(lambda: 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        cd.sweep(lambda a: a, a=jnp.ones(3), chunk_size=0)
    with pytest.raises(ValueError, match="Unknown axes"):
        cd.sweep(lambda a: a, a=jnp.ones(3)).sel(b=1.0)


def test_sharded_sweep_on_4_fake_devices_equals_unsharded():
    code = textwrap.dedent("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        import coupled_diffusion as cd
        assert len(jax.devices()) == 4, jax.devices()
        f = lambda g, theta: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0),
                                                cd.TwoClassMixture.from_angle(1.0, 1.0, theta), throw=False).value
        g, th = jnp.linspace(0.0, 2.0, 37), jnp.linspace(0.0, np.pi, 11)
        sharded = cd.sweep(f, g=g, theta=th, chunk_size=16)
        single = cd.sweep(f, g=g, theta=th, devices=jax.devices()[:1])
        np.testing.assert_array_equal(np.isnan(sharded.values), np.isnan(single.values))
        np.testing.assert_allclose(sharded.values, single.values, rtol=1e-13)
        print("ok", np.isfinite(sharded.values).sum())
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
