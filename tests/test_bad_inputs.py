"""No silent wrong numbers: the catalogue of bad inputs that once returned a number or ran on.

One row per case: what is done, and the error (or warning) that must come instead, naming the
parameter. Each row returned a plausible number, NaNs or a silently moved value before its
check was added (issue 21). Under `jit`, where values are traced, the theory solvers report
the same cases through their result codes (`throw=False`); see tests/test_speciation.py.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import coupled_diffusion as cd
from coupled_diffusion.diffusion.config import TrainConfig

OU = cd.CoupledOU.symmetric(1.0, 0.3, 2.0)
UNSTABLE = cd.CoupledOU(np.diag([0.5, -1.0]), 2.0)  # a positive eigenvalue: the forward process diverges
DATA = cd.TwoClassMixture.from_angle(1.0, 1.0, 0.5)


def _reverse(z=None, **kw):
    score = cd.PopulationScore.of(OU, DATA, cd.realize_means(DATA, 4))
    z = jnp.zeros((3, 2, 4)) if z is None else z
    return cd.reverse_sde(OU, score, z, key=jax.random.key(0), **{"t_start": 1.0, "n_steps": 10, **kw})


def _step(which="ddpm", t=5, t_prev=4, eps=None, draw=None, **kw):
    sched, z = cd.VPSchedule.linear(200), jnp.zeros((2, 4, 4, 2))
    eps, draw = z if eps is None else eps, z if draw is None else draw
    if which == "ddpm":
        return cd.ddpm_step(sched, z, eps, jnp.asarray(t), jnp.asarray(t_prev), draw, **kw)
    return cd.ddim_step(sched, z, eps, jnp.asarray(t), jnp.asarray(t_prev), **kw)


def _sample(**kw):
    sched, noise = cd.VPSchedule.linear(20), cd.ModeNoise.paired(0.3)
    return cd.sample(lambda z, t: z, sched, noise, jax.random.key(0), jnp.zeros((2, 4, 4, 2)), num_steps=4, **kw)


def _jitted_step(t):
    sched, z = cd.VPSchedule.linear(200), jnp.zeros((2, 4, 4, 2))
    return jax.jit(lambda t: cd.ddpm_step(sched, z, z, t, t - 1, z))(jnp.int32(t))


def _mnist(tmp_path, x=None, y=None):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (12, 28, 28)).astype(np.float32) if x is None else x
    y = np.arange(12) % 10 if y is None else y
    np.savez(tmp_path / "m.npz", x_train=x, y_train=y)
    return cd.load_mnist("train", tmp_path / "m.npz")


def _nan_unet_weights():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from coupled_diffusion.models.pretrained import unet_from_diffusers

    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=4, attention_head_dim=4)
    model = diffusers.UNet2DModel(**config)
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    tensors["conv_in.bias"][1] = np.nan
    return unet_from_diffusers(dict(model.config), tensors)


def _config(**changes):
    dataclasses.replace(TrainConfig(), **changes).validate()


def _schedule_experiment(lr):
    from coupled_diffusion.experiments.schedule_opt import schedule_experiment

    return schedule_experiment(learning_rate=lr, steps=1, n_val=8, n_test=8, progress=False)


# (id, call, expected exception, message pattern); `call` takes pytest's tmp_path
CASES = [
    # theory
    ("unstable-M-moments", lambda p: cd.moments(UNSTABLE, DATA, 1.0), ValueError, r"`moments` needs a stable M.*eigenvalues"),
    ("unstable-M-kappa", lambda p: cd.kappa(UNSTABLE, DATA, 1.0), ValueError, r"`kappa` needs a stable M"),
    ("unstable-M-speciation", lambda p: cd.speciation_time(UNSTABLE, DATA), ValueError, r"Unstable forward process"),
    ("schedule-g-above-beta", lambda p: cd.CoupledOU.symmetric(1.0, cd.Constant(1.5), 2.0), ValueError,
     r"needs \|g\(t\)\| < beta at every time.*sup \|g\(t\)\| = 1.5 >= beta = 1"),
    ("kappa-negative-t", lambda p: cd.kappa(OU, DATA, -1.0), ValueError, r"`t` must be finite forward times >= 0"),
    ("kappa-nan-t", lambda p: cd.kappa(OU, DATA, np.nan), ValueError, r"`t` must be finite forward times >= 0"),
    ("collapse-target-out-of-range", lambda p: cd.collapse_time(OU, DATA, alpha=1.0, conditional=True, target=5), ValueError,
     r"`target` must index one of the k = 2 modalities"),
    # schedules
    ("schedule-nan-value", lambda p: cd.PiecewiseLinear([0.0, 1.0], [0.0, np.nan]), ValueError, r"`values` must be finite"),
    ("schedule-nan-value-bounded", lambda p: cd.PiecewiseLinear.from_values([0.0, 1.0], [0.0, np.nan], bound=1.0), ValueError,
     r"`values` must be finite"),
    # exact-score sampling
    ("reverse-sde-nan-state", lambda p: _reverse(jnp.zeros((3, 2, 4)).at[1, 0, 2].set(jnp.nan)), ValueError,
     r"`z` holds 1 non-finite entries \(the first at index \(1, 0, 2\)\)"),
    ("reverse-sde-wrong-k", lambda p: _reverse(jnp.zeros((3, 3, 4))), ValueError,
     r"`z` must hold states of shape \(\.\.\., k, d\) with k = 2"),
    ("reverse-sde-save-at-off-grid", lambda p: _reverse(save_at=[0.55]), ValueError, r"`save_at` times must lie on the sampler's grid"),
    # discrete diffusion
    ("ddpm-t-equals-T", lambda p: _step(t=200, t_prev=199), ValueError, r"timestep `t` must lie in \[0, T = 200\)"),
    ("ddpm-t-500", lambda p: _step(t=500, t_prev=499), ValueError, r"timestep `t` must lie in \[0, T = 200\)"),
    ("ddpm-t-minus-1", lambda p: _step(t=-1, t_prev=-2), ValueError, r"timestep `t` must lie in \[0, T = 200\)"),
    ("ddpm-t-equals-T-under-jit", lambda p: _jitted_step(200), RuntimeError, r"a reverse step needs timesteps 0 <= t < T = 200"),
    ("ddpm-one-noise-draw-for-a-batch", lambda p: _step(draw=jnp.zeros((1, 4, 4, 2))), ValueError,
     r"`noise_draw` must have the shape of `z_t`, \(2, 4, 4, 2\), got \(1, 4, 4, 2\)"),
    ("ddim-eps-wrong-channels", lambda p: _step("ddim", eps=jnp.zeros((2, 4, 4, 3))), ValueError,
     r"`eps_hat` must have the shape of `z_t`"),
    ("ddpm-t-wrong-batch", lambda p: _step(t=[5, 5, 5], t_prev=[4, 4, 4]), ValueError,
     r"`t` must be a scalar or of shape \(B,\) = \(2,\)"),
    ("ddim-float-timestep", lambda p: _step("ddim", t=5.0, t_prev=4.0), ValueError, r"`t` must hold integer timesteps"),
    ("ddim-t-prev-above-t", lambda p: _step("ddim", t=5, t_prev=7), ValueError, r"`t_prev` must be below `t`"),
    ("ddim-negative-eta", lambda p: _step("ddim", eta=-0.1), ValueError, r"`eta` must be a concrete scalar >= 0"),
    ("ddpm-clip-negative", lambda p: _step(clip=-1.0), ValueError, r"`clip` must be None \(no bound\) or a finite number > 0"),
    ("ddim-clip-nan", lambda p: _step("ddim", clip=float("nan")), ValueError, r"`clip` must be None \(no bound\) or a finite number > 0"),
    ("sample-clip-zero", lambda p: _sample(clip=0.0), ValueError, r"`clip` must be None \(no bound\) or a finite number > 0"),
    ("vp-schedule-barely-noised", lambda p: cd.VPSchedule.linear(200, beta_start=1e-4, beta_end=1e-3), UserWarning,
     r"terminal_signal = .* = 0\.9"),
    # data
    ("mnist-images-last", lambda p: _mnist(p, x=np.zeros((28, 28, 12), np.float32)), ValueError,
     r"must be \(N, 28, 28\).*got shape \(28, 28, 12\).*np\.moveaxis"),
    ("mnist-label-outside-0-9", lambda p: _mnist(p, y=np.arange(12)), ValueError, r"labels .* must be digits 0-9, got values in \[0, 11\]"),
    ("mnist-nan-pixel", lambda p: _mnist(p, x=np.where(np.arange(12)[:, None, None] == 4, np.nan, np.zeros((12, 28, 28)))),
     ValueError, r"non-finite pixels \(the first in image 4\)"),
    # models
    ("weights-with-nan", lambda p: _nan_unet_weights(), ValueError, r"'conv_in.bias'.*holds 1 non-finite values"),
    # training configuration and schedule optimisation
    ("config-n-train-negative", lambda p: _config(n_train=-1), ValueError, r"`n_train` must be an integer >= 1"),
    ("config-dropout-above-1", lambda p: _config(dropout=1.5), ValueError, r"`dropout` must be a finite number in \[0, 1\)"),
    ("config-grad-clip-negative", lambda p: _config(grad_clip=-1.0), ValueError, r"`grad_clip` must be a finite number > 0"),
    ("schedule-opt-lr-zero", lambda p: _schedule_experiment(0.0), ValueError, r"`learning_rate` must be a finite number > 0"),
    ("schedule-opt-lr-negative", lambda p: _schedule_experiment(-0.1), ValueError, r"`learning_rate` must be a finite number > 0"),
]


@pytest.mark.parametrize(("call", "expected", "match"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_reported_not_computed(call, expected, match, tmp_path):
    if issubclass(expected, Warning):
        with pytest.warns(expected, match=match):
            call(tmp_path)
    else:
        with pytest.raises(expected, match=match):
            call(tmp_path)


# one invalid value for every field of TrainConfig: a field added without validation fails here
BAD_FIELD_VALUES = {
    "transform": "sharpen", "pairing": "shuffled", "classes": (3, 3), "data_path": "", "n_train": 0, "balance": "yes",
    "T": 1, "schedule": "quadratic", "g": float("nan"), "whitened_loss": "yes",
    "block_channels": (16, 0), "layers_per_block": 0, "attention": (False, True), "num_groups": 0, "attention_head_dim": 0,
    "dropout": -0.1, "bf16": 1,
    "lr": -1e-3, "warmup_steps": -1, "weight_decay": float("inf"), "grad_clip": 0.0, "ema_decay": 1.0,
    "steps": 0, "batch_size": 2.5, "seed": -1,
    "log_every": 0, "ckpt_every": 0, "keep": 0,
}


def test_the_bad_value_table_covers_every_config_field():
    assert set(BAD_FIELD_VALUES) == set(TrainConfig.fields())


@pytest.mark.parametrize("field", sorted(BAD_FIELD_VALUES))
def test_every_config_field_is_validated_by_name(field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(**{field: BAD_FIELD_VALUES[field]})


def test_valid_inputs_next_to_the_bad_ones_still_work(tmp_path):
    # the checks must not reject what is right next to the bad cases
    assert np.isfinite(float(cd.kappa(OU, DATA, 0.0)))
    assert _reverse(n_steps=np.int64(10)).shape == (3, 2, 4)  # a NumPy integer is an integer
    assert _reverse(save_at=[0.5, 0.3])[0].shape == (2, 3, 2, 4)  # grid times, given as decimals
    assert _step(t=199, t_prev=-1).shape == (2, 4, 4, 2) and _step("ddim", t=5, t_prev=-1, eta=0.0).shape == (2, 4, 4, 2)
    x, y = _mnist(tmp_path, x=np.full((12, 784), 255, np.uint8))  # flat uint8 images
    assert x.shape == (12, 28, 28) and x.max() == 1.0 and y.dtype == np.int32
    cd.TrainConfig.paper().validate()
    as_path = TrainConfig(data_path=tmp_path / "m.npz")  # a path object is kept as text, so config.json can hold it
    assert as_path.data_path == str(tmp_path / "m.npz") and json.dumps(as_path.to_json())
    _config(classes=(3, 5), pairing="ctrl", n_train=100, dropout=0.1, seed=0)


@pytest.mark.parametrize(("argv", "match"), [
    pytest.param(["train", "--channels", "16,abc"], "argument --channels: expected comma-separated positive integer widths", id="channels"),
    pytest.param(["train", "--classes", "3,five"], "argument --classes: expected comma-separated digits 0-9", id="classes"),
    pytest.param(["exact-score", "--dims", "64,x"], "argument --dims: expected comma-separated positive integers", id="dims"),
    pytest.param(["optimize-schedule", "--thetas", "0.5,pi"], "argument --thetas: expected comma-separated numbers", id="thetas"),
])
def test_cli_list_flags_fail_as_usage_errors_not_tracebacks(argv, match, capsys):
    from coupled_diffusion.cli import main

    with pytest.raises(SystemExit) as stop:  # argparse's exit: before any JAX work or CPU tuning
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and match in err and "Traceback" not in err
