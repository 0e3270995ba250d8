"""Appendix C (conditional coupling): the measured effects, weak increments, and the CLI."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from coupled_diffusion.experiments.conditional import conditional_experiment

SMALL = dict(n_trials=1000, n_steps=200, thetas=[0.0, np.pi], g0s=(1.0,), schedules=("const", "early"))


@pytest.fixture(scope="module")
def gaussian_run():
    return conditional_experiment(**SMALL, key=jax.random.key(0))


def test_coupling_effect_changes_sign_with_theta(gaussian_run):
    r = gaussian_run["runs"]["const/g0=1.0"]
    # aligned modalities (theta = 0): coupling lowers alignment accuracy; anti-aligned: raises it
    assert r["d_acc"][0] < -4 * r["se_acc"][0]
    assert r["d_acc"][1] > 4 * r["se_acc"][1]
    # over-guidance at g0 = 1: the NLL is worse at every angle
    assert np.all(r["d_nll"] > 4 * r["se_nll"])


def test_weak_increments_agree_with_gaussian_within_monte_carlo_error(gaussian_run):
    weak = conditional_experiment(**SMALL, increments="rademacher", key=jax.random.key(1))
    for m in ("acc", "mse", "nll"):
        g, w = gaussian_run["baseline"], weak["baseline"]
        assert np.all(np.abs(g[m] - w[m]) < 4 * np.hypot(g["se_" + m], w["se_" + m])), m
        for name in gaussian_run["runs"]:
            g, w = gaussian_run["runs"][name], weak["runs"][name]
            assert np.all(np.abs(g["d_" + m] - w["d_" + m]) < 4 * np.hypot(g["se_" + m], w["se_" + m])), (name, m)


def test_bad_schedule_name_raises():
    with pytest.raises(ValueError, match="schedule"):
        conditional_experiment(schedules=("sometimes",))


@pytest.mark.slow  # ~40 s (a subprocess); the conditional sampler itself is tested above; run with -m slow
def test_conditional_command_writes_three_figures_and_json(tmp_path):
    out = tmp_path / "cond"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "conditional", "--out", str(out), "--n-trials", "64",
                           "--n-steps", "40", "--n-theta", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for n, g0 in zip((12, 13, 14), (0.2, 0.5, 1.0)):
        png = out / f"figure{n}_g0_{g0}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "conditional.json").read_text())
    assert len(d["theta"]) == 3 and set(d["runs"]) == {f"{s}/g0={g}" for s in ("const", "late", "early") for g in (0.2, 0.5, 1.0)}
    assert "theta" in proc.stderr  # progress display
