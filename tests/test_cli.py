import json
import subprocess
import sys

import numpy as np
import pytest


def test_figures_command_writes_pngs_and_json(tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "figures", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for i in range(1, 6):
        png = out / f"figure{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        d = json.loads((out / f"figure{i}.json").read_text())
        assert "g" in d and "params" in d
    f1 = json.loads((out / "figure1.json").read_text())
    common = np.array(f1["common_mode"], float)
    assert abs(f1["g"][int(np.nanargmax(common))] - 0.44) < 0.03
    assert "figure5" in proc.stderr  # progress display


@pytest.mark.slow  # ~40 s (a subprocess); run with -m slow
def test_exact_score_command_runs_small(tmp_path):
    out = tmp_path / "es"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "exact-score", "--out", str(out), "--dims", "16",
                           "--n-pairs", "64", "--n-steps", "60", "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    clo = json.loads((out / "cloning.json").read_text())
    c = clo["curves"]["16"]
    assert c["agreement"][0] > 0.9 and abs(c["t_s_kappa"] - 0.5 * np.log(32)) < 1e-6  # d kappa = 2 d e^{-2t} = 1
    mem = json.loads((out / "memorization.json").read_text())
    assert [r["n"] for r in mem["cases"]] == [64, 512]
    assert (out / "cloning.png").exists() and (out / "memorization.png").exists()


def test_patterns_command_rejects_bad_values_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "patterns", "--patch", "4"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "odd patch side" in proc.stderr
    from coupled_diffusion.cli import main

    assert main(["patterns", "--out", str(tmp_path / "p"), "--unet-run", str(tmp_path)]) == 2  # no checkpoints/ there
    assert main(["patterns", "--out", str(tmp_path / "p"), "--side", "7", "--patch", "9"]) == 2


@pytest.mark.slow  # ~70 s (a subprocess); run with -m slow
def test_patterns_command_runs_small(tmp_path):
    out = tmp_path / "pat"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "patterns", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    d = json.loads((out / "patterns.json").read_text())
    assert set(d["models"]) == {"gaussian", "two_cluster", "patch_empirical", "full_empirical"}
    assert d["jvp_vs_exact_max_abs"] < 1e-4  # float32: the two routes to the same symbol
    assert abs(sum(d["params"]["two_cluster_weights"]) - 1) < 1e-6
    rms = {k: m["nearest_rms"]["median"] for k, m in d["models"].items()}
    assert rms["full_empirical"] < min(rms["gaussian"], rms["two_cluster"], rms["patch_empirical"])  # memorises vs creates
    for name in ("mode_rates", "correlation_length", "samples", "guidance", "mixture_rates"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    g = json.loads((out / "guidance.json").read_text())  # the exact Gaussian-mixture digits: t_c and the comparison
    assert g["t_c_result"] == "found" and g["params"]["t_c"] == g["t_c"]
    assert {"none", "pulse", "constant"} <= set(g["conditions"]) and "pulse-constant" in g["differences"]


@pytest.mark.slow  # ~2 min: a tiny U-Net trained, then the quick patterns run with it
def test_patterns_command_reads_a_trained_unet(tmp_path):
    import coupled_diffusion as cd

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (48, 28, 28)).astype(np.float32)
    y = np.arange(48) % 4
    np.savez(tmp_path / "mini.npz", x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    config = cd.TrainConfig(block_channels=(8, 8), attention=(False, False), num_groups=4, T=20, batch_size=8, steps=2, lr=1e-3,
                            warmup_steps=1, log_every=1, ckpt_every=2, keep=1, data_path=str(tmp_path / "mini.npz"))
    cd.train(config, tmp_path / "run", progress=False)
    out = tmp_path / "pat"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "patterns", "--out", str(out), "--quick",
                           "--unet-run", str(tmp_path / "run")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    net = json.loads((out / "unet_criticality.json").read_text())
    assert net["step"] == 2 and len(net["ou_times"]) == len(net["top"]) and np.all(np.isfinite(net["top"]))
    assert (out / "unet_mode_rates.png").read_bytes()[:4] == b"\x89PNG"
