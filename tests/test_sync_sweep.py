"""The `mnist-sync` sweep on tiny models: wiring, exact resume after a kill, `--models`, bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from coupled_diffusion.cli import main
from coupled_diffusion.diffusion.config import TrainConfig
from coupled_diffusion.experiments.sync_sweep import SyncSweep, run_sync_sweep


def _npz(path):
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 4
        x = rng.uniform(0, 0.1, (n, 28, 28)).astype(np.float32)
        for i in range(n):
            r, c = 3 + 5 * (y[i] % 2), 3 + 5 * (y[i] // 2)
            x[i, r:r + 10, c:c + 10] = rng.uniform(0.6, 1.0)
        return x, y

    (xt, yt), (xs, ys) = split(64), split(32)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    return str(path)


def _sweep(tmp_path, **kw):
    base = TrainConfig(block_channels=(8, 8), attention=(False, True), num_groups=4, attention_head_dim=4, T=20, batch_size=8,
                       steps=4, lr=1e-3, warmup_steps=1, log_every=2, ckpt_every=2, keep=2, transform="blur",
                       data_path=_npz(tmp_path / "mini.npz"))
    small = dict(gs=(0.5,), pairings=("main", "ctrl"), seeds=(0,), train=base, eval_n=2, intervention_g=0.5, intervention_points=2,
                 clone_gs=(0.3,), clone_classes=(0, 1), scan_points=3, clone_n=4, clone_repeats=1, clone_steps=None,
                 classifier_steps=20, quality_n=0)
    return SyncSweep(**(small | kw))


def _evals(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}


@pytest.mark.slow  # ~100 s: three tiny models trained twice
def test_a_killed_sweep_resumes_without_retraining_and_gives_the_same_table(tmp_path):
    sweep = _sweep(tmp_path)
    full = run_sync_sweep(sweep, tmp_path / "a", progress=False)
    assert full["complete"] and len(_evals(tmp_path / "a")) == 3
    part = run_sync_sweep(sweep, tmp_path / "b", progress=False, stop_after=1)  # killed after one job
    assert not part["complete"] and len(part["missing"]) == 2
    first = next((tmp_path / "b" / "eval").glob("*.json"))
    stamp = first.stat().st_mtime_ns
    rest = run_sync_sweep(sweep, tmp_path / "b", progress=False)
    assert rest["complete"] and first.stat().st_mtime_ns == stamp  # the finished job was not redone
    assert _evals(tmp_path / "a") == _evals(tmp_path / "b")  # the same numbers as the uninterrupted sweep
    assert (tmp_path / "a" / "table1.md").read_text() == (tmp_path / "b" / "table1.md").read_text()
    # evaluating the models of one sweep from another folder: nothing retrained, the same evaluations
    shutil.copytree(tmp_path / "a" / "models", tmp_path / "elsewhere")
    again = run_sync_sweep(sweep, tmp_path / "c", models_dir=tmp_path / "elsewhere", progress=False)
    assert again["complete"] and _evals(tmp_path / "c") == _evals(tmp_path / "a")
    assert not (tmp_path / "c" / "models").exists()


@pytest.mark.slow  # ~60 s: one tiny model trained; the summary, table and figures are tested by default below
def test_a_minimal_sweep_writes_the_table_and_the_summary(tmp_path, capsys):
    sweep = _sweep(tmp_path, pairings=("main",), clone_gs=(0.5,), quality_n=4, quality_classifier_steps=5)
    sweep = dataclasses.replace(sweep, train=sweep.train.replace(classes=(0, 1)))  # Protocol I on the clone classes
    out = tmp_path / "s"
    summary = run_sync_sweep(sweep, out, progress=False)
    assert summary["complete"] and [r["pairing"] for r in summary["table1"]] == ["main"]
    # one model for both protocols, scored once
    assert [p.name for p in (out / "models").iterdir()] == ["g0.5_main_c01_s0"]
    ev = _evals(out)
    assert sorted(ev) == ["p1_g0.5_main_c01_s0.json", "p2_g0.5_main_c01_s0.json"]
    assert "quality" in ev["p1_g0.5_main_c01_s0.json"] and "quality" not in ev["p2_g0.5_main_c01_s0.json"]
    p1 = ev["p1_g0.5_main_c01_s0.json"]["protocol1"]
    assert len(p1["t"]) == 20 and set(p1["gaps"]) == {"0.9", "0.95", "0.98"}
    assert [r["t_int"] for r in ev["p1_g0.5_main_c01_s0.json"]["intervention"]] == sweep.intervention_times()
    p2 = ev["p2_g0.5_main_c01_s0.json"]["protocol2"]
    assert p2["t"] == sweep.scan_times() and p2["n_pairs"] == 4
    for name in ("figure6", "figure7", "figure8", "figure9", "figure10", "figure11a", "figure11b"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    band = summary["protocol2"][0]["t_spec_u_band"]
    assert [c["status"] for c in band] and summary["protocol1"]["p1_g0.5_main_c01_s0"]["trajectory"]["t"][0] == 19
    md = (out / "table1.md").read_text()
    assert md.startswith("| g | pairing | Delta t(0.9) | Delta t(0.95) | Delta t(0.98) |") and "| 0.5 | MAIN |" in md
    with pytest.raises(ValueError, match="different configuration"):
        run_sync_sweep(_sweep(tmp_path, pairings=("main",), clone_gs=(0.5,), eval_n=3), out, progress=False)


@pytest.mark.parametrize(("kw", "match"), [
    pytest.param(dict(gs=(1.2,)), r"`gs` must be a non-empty list of couplings g in \[0, 1\)", id="g-above-1"),
    pytest.param(dict(gs=()), r"`gs` must be a non-empty list", id="no-g"),
    pytest.param(dict(pairings=("shuffled",)), r"`pairings` must be a non-empty subset of \('main', 'ctrl'\)", id="pairing"),
    pytest.param(dict(taus=(0.9, 1.0)), r"`taus` must lie in \(0, 1\)", id="tau"),
    pytest.param(dict(phi_star=0.0), r"`phi_star` must lie in \(0, 1\)", id="phi-star"),
    pytest.param(dict(clone_classes=(3, 3)), r"`clone_classes` must be two different digits", id="classes"),
    pytest.param(dict(scan_points=0), r"`scan_points` must be an integer >= 1", id="scan-points"),
    pytest.param(dict(clip=-1.0), r"`clip` must be None \(no bound\) or a finite number > 0", id="clip"),
    pytest.param(dict(robust_gs=(1.0,)), r"`robust_gs` must be couplings g in \[0, 1\)", id="robust-g"),
    pytest.param(dict(robust_T=1), r"`robust_T` must be None or an integer >= 2", id="robust-T"),
])
def test_bad_sweep_settings_name_the_parameter(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_sync_sweep(_sweep(tmp_path, **kw), tmp_path / "x", progress=False)


def test_the_protocols_share_a_model_trained_on_the_clone_classes():
    # the CPU default: Protocol I on the digits 0 and 1, so Protocol II's MAIN models are Protocol I's
    cpu = SyncSweep()
    assert cpu.models() == [f"g{g}_{p}_c01_s0" for g in ("0", "0.3", "0.5") for p in ("main", "ctrl")]
    assert {j["model"] for j in cpu.p2_jobs()} == {f"g{g}_main_c01_s0" for g in ("0", "0.3", "0.5")}
    for job in cpu.p1_jobs() + cpu.p2_jobs():
        c = cpu.job_config(job)
        assert (c.g, c.pairing, c.seed, c.classes) == (job["g"], job["pairing"], job["seed"], (0, 1))
    # the paper: Protocol I on all digits, Protocol II's two-class models apart: 4 x 2 x 4 + 7 x 4
    paper = SyncSweep.paper()
    assert len(paper.models()) == 32 + 28 + 16 and paper.job_config(paper.p1_jobs()[0]).classes is None  # + T = 500 at 0.3, 0.5
    assert paper.p2_jobs()[0]["model"] == "g0_main_c01_s0" and paper.p1_jobs()[0]["model"] == "g0_main_s0"


def test_a_models_folder_without_the_runs_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no run for model 'g0.5_main_s0' of job 'p1_g0.5_main_s0'"):
        run_sync_sweep(_sweep(tmp_path), tmp_path / "x", models_dir=tmp_path / "empty", progress=False)


@pytest.mark.parametrize(("argv", "match"), [
    (["mnist-sync", "--gs", "0.3,1.5"], r"`gs` must be a non-empty list of couplings"),
    (["mnist-sync", "--seeds", "0,-1"], r"argument --seeds: expected comma-separated integers >= 0"),
    (["mnist-sync", "--models", "/nonexistent/runs"], r"--models /nonexistent/runs: no such folder"),
])
def test_mnist_sync_cli_errors_are_one_line(argv, match, capsys):
    import re

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and "Traceback" not in err


def test_the_table_summary_and_figures_from_evaluations(tmp_path):
    """What the sweep does after its jobs, on evaluations of an exact-eps model (no training)."""
    import jax.numpy as jnp
    from flax import nnx

    import coupled_diffusion as cd
    from coupled_diffusion.experiments.mnist_sync import intervention_curve, protocol1, protocol2
    from coupled_diffusion.experiments.sync_sweep import _p1_record, _write_json, _write_table, summarize_sweep, write_figures

    sweep = _sweep(tmp_path, gs=(0.5,), pairings=("main", "ctrl"), clone_gs=(0.5,), robust_gs=(0.5,), robust_T=40, robust_eval_n=3)
    rng = np.random.default_rng(0)
    protos = jnp.asarray(rng.uniform(-1, 1, (2, 28, 28, 2)).astype(np.float32))
    sched, noise = cd.VPSchedule.linear(20), cd.ModeNoise.paired(0.5)
    eps = cd.EmpiricalEps(protos, sched, noise)
    clf = {"c_u": cd.ModeClassifier(2, rngs=nnx.Rngs(0)), "c_v": cd.ModeClassifier(2, symmetric=True, rngs=nnx.Rngs(1))}
    (tmp_path / "eval").mkdir()
    for job in sweep.p1_jobs():
        rec = {"job": job, "protocol1": _p1_record(protocol1(eps, sched, noise, n=2, seed=job["seed"]), sweep.taus)}
        rec["intervention"] = intervention_curve(eps, sched, noise, t_ints=sweep.intervention_times(), n=2)
        _write_json(tmp_path / "eval" / f"{job['name']}.json", rec)
    job = sweep.p2_jobs()[0]
    p2 = protocol2(eps, sched, noise, clf, scan_t=sweep.scan_times(), n=4, seed=0) | {"classifier_accuracy": {"u": 1.0, "v": 1.0}}
    _write_json(tmp_path / "eval" / f"{job['name']}.json", {"job": job, "protocol2": p2})
    # the robustness checks: a T = 40 model and a batch-3 evaluation per pairing, with hand-set gaps
    robust = sweep.robust_jobs()
    assert [(j["name"], j["T"], j["eval_n"]) for j in robust] == [
        ("p1T40_g0.5_main_T40_s0", 40, 2), ("p1n3_g0.5_main_s0", 20, 3), ("p1T40_g0.5_ctrl_T40_s0", 40, 2),
        ("p1n3_g0.5_ctrl_s0", 20, 3)]
    assert sweep.job_config(robust[0]).T == 40 and robust[1]["model"] == sweep.p1_jobs()[0]["model"]  # same model, bigger batch
    base = json.loads((tmp_path / "eval" / f"{sweep.p1_jobs()[0]['name']}.json").read_text())["protocol1"]
    for i, job in enumerate(robust):
        crossed = {"time": 10.0, "status": "crossed", "bound": None}
        gaps = {f"{tau:g}": {"gap": -float(i + 1), "t_u": crossed, "t_v": crossed} for tau in sweep.taus}
        _write_json(tmp_path / "eval" / f"{job['name']}.json", {"job": job, "protocol1": base | {"gaps": gaps}})
    _write_json(tmp_path / "summary.json", summarize_sweep(sweep, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and [r["pairing"] for r in summary["table1"]] == ["main", "ctrl"]
    cell = summary["table1"][0]["0.9"]
    assert cell["n_seeds"] == 1 and (cell["n_crossed"] == 1) == (cell["mean"] is not None)
    _write_table(tmp_path, summary)
    md = (tmp_path / "table1.md").read_text().splitlines()
    assert md[0] == "| g | pairing | Delta t(0.9) | Delta t(0.95) | Delta t(0.98) |" and md[2].startswith("| 0.5 | MAIN |")
    rows = [(r["pairing"], r["T"], r["eval_n"], r["0.95"]["mean"]) for r in summary["robustness"]]
    assert rows == [("main", 40, 2, -1.0), ("ctrl", 40, 2, -3.0), ("main", 20, 3, -2.0), ("ctrl", 20, 3, -4.0)]
    assert "| 0.5 | CTRL | 20 | 3 | -4.0 | -4.0 | -4.0 |" in md
    assert set(summary["protocol1"]) == {j["name"] for j in sweep.p1_jobs()}  # the figures' curves: Protocol I's own
    names = {p.name for p in write_figures(summary, tmp_path, sweep)}
    assert names == {f"figure{i}.png" for i in ("6", "7", "8", "9", "10", "11a", "11b")}


def test_the_intervention_curve_goes_to_the_nearest_protocol1_coupling(tmp_path):
    assert _sweep(tmp_path, gs=(0.0, 0.3, 0.9)).intervention_job_g() == 0.3
    assert _sweep(tmp_path, gs=(0.5,), intervention_g=0.1).intervention_job_g() == 0.5
