r"""The Section 5 sweep: every model both protocols need, trained or reused, evaluated, and tabulated.

[`run_sync_sweep`][] trains (or resumes, exactly) each model the jobs need once, under
`<out>/models/<model>/` with the training loop (`<model>` = `g<g>_<pairing>[_c<classes>]_s<seed>`),
evaluates each job once into `<out>/eval/<job>.json` (written atomically), and aggregates
Table 1 (`table1.json`, `table1.md`) and `summary.json`. A killed sweep loses at most the job it
was in (and, inside a training job, one checkpoint interval): restarted, it reuses every
finished model and evaluation, and gives the same numbers as an uninterrupted sweep.

Jobs:

- Protocol I (Table 1): one per `(g, pairing, seed)` over `gs x pairings x seeds`, on the digits
  of `train.classes` (the paper: all ten; the CPU default: the two clone classes); each evaluated
  by [`protocol1`][] (batch `eval_n`) and by the pair classifier's sample quality.
- the intervention curve (eq 101): the MAIN and CTRL models at the g of `gs` nearest `intervention_g`, first seed;
- Protocol II: one per `(g, seed)` over `clone_gs x seeds`, MAIN, on the two `clone_classes`,
  evaluated by [`protocol2`][] with mode classifiers fitted once. Where Protocol I's MAIN model
  at that `(g, seed)` was trained on the same two digits, it is that model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from .._runlock import RunLock
from ..diffusion.config import TrainConfig, _is_int, _is_real, _need, _need_int, _need_real
from ..diffusion.samplers import check_clip, timesteps
from ..diffusion.sync import check_level
from ..diffusion.train import load_run, train
from .mnist_sync import TAUS, fit_mode_classifiers, intervention_curve, protocol1, protocol2, run_eps


def _cpu_model() -> TrainConfig:
    # the default run's U-Net (16, 32, 32), attention at 7 x 7 only: about 4 steps/s at batch 64 on 2 cores
    # (a (16, 32) U-Net with attention at 14 x 14 ran at 1.8 steps/s, measured); on the digits 0 and 1,
    # 1200 steps give 95% recognisable MAIN pairs at g = 0.5 (600 steps: 75%; README); balanced,
    # because CTRL pairs of two classes need as many of each (MAIN gets the same images)
    return TrainConfig(T=200, batch_size=64, steps=1200, lr=2e-3, warmup_steps=100, ema_decay=0.995, log_every=50,
                       ckpt_every=200, classes=(0, 1), balance=True)


@dataclasses.dataclass(frozen=True)
class SyncSweep:
    """What the sweep runs; the defaults fit a 2-core CPU (README, "Synchronization experiments"),
    [`SyncSweep.paper`][] is the paper's scale for an accelerator.

    **Arguments:**

    - `gs`, `pairings`, `seeds`: Protocol I's grid (Table 1: g in {0, 0.3, 0.5, 0.7}, MAIN and CTRL, 4 seeds;
        the CPU default: g in {0, 0.3, 0.5}, one seed).
    - `train`: the base [`TrainConfig`][]; each job replaces `g`, `pairing`, `seed` (and `classes` for Protocol II).
        Its `classes` are Protocol I's digits: the CPU default trains on the clone classes (0 and 1), so
        that Protocol II reuses the MAIN models; [`SyncSweep.paper`][] on all ten.
    - `eval_n`, `taus`: Protocol I's evaluation batch and thresholds.
    - `intervention_g`, `intervention_sigma`, `intervention_points`: the intervention curve, at this many
        timesteps evenly over the grid (the paper: one point, t = 260 of 500, sigma = 0.25).
    - `clone_gs`, `clone_classes`, `scan_points`, `clone_n`, `clone_repeats`, `clone_steps`, `phi_star`:
        Protocol II (the paper: g in {0, 0.1, ..., 0.6}, two classes, batch 128, 5 repeats, phi* = 0.55).
    - `clip`: the samplers bound x0-hat to `[-clip, clip]` in each step (diffusers' default; None: unbounded).
    - `robust_gs`, `robust_T`, `robust_eval_n`: the paper's two robustness checks of Protocol I, at each g
        of `robust_gs` (MAIN and CTRL, every seed): models trained with the longer horizon `robust_T`
        (the paper: T = 500 at g = 0.3 and 0.5), and the Protocol I models evaluated again with the
        larger batch `robust_eval_n` (the paper does not say how large). None skips either; the CPU
        default has no `robust_gs`, [`SyncSweep.paper`][] has (0.3, 0.5).
    - `classifier_steps`: training steps of the mode classifiers C_u, C_v.
    - `quality_n`: samples scored by the pair classifier per model (0: skip); `quality_classifier_steps`:
        its training steps (`evaluate_run`'s default).
    """

    gs: tuple = (0.0, 0.3, 0.5)
    pairings: tuple = ("main", "ctrl")
    seeds: tuple = (0,)
    train: TrainConfig = dataclasses.field(default_factory=_cpu_model)
    eval_n: int = 16
    taus: tuple = TAUS
    intervention_g: float = 0.5
    intervention_sigma: float = 0.25
    intervention_points: int = 9
    clone_gs: tuple = (0.0, 0.3, 0.5)
    clone_classes: tuple = (0, 1)
    scan_points: int = 8
    clone_n: int = 64
    clone_repeats: int = 2
    clone_steps: int | None = 50
    phi_star: float = 0.55
    clip: float | None = 1.0
    robust_gs: tuple = ()
    robust_T: int | None = 500
    robust_eval_n: int | None = 64
    classifier_steps: int = 800
    quality_n: int = 128
    quality_classifier_steps: int = 2000

    @classmethod
    def paper(cls, **overrides) -> SyncSweep:
        """The paper's scale: 4 seeds, the paper's U-Net at T = 200 and 20 epochs, Protocol II at g = 0, 0.1, ..., 0.6."""
        kw = dict(gs=(0.0, 0.3, 0.5, 0.7), seeds=(0, 1, 2, 3), train=TrainConfig.paper(),
                  clone_gs=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6), clone_n=128, clone_repeats=5, clone_steps=None, scan_points=20,
                  quality_n=256, robust_gs=(0.3, 0.5))
        return cls(**(kw | overrides))

    def validate(self) -> None:
        for name in ("gs", "clone_gs"):
            vals = getattr(self, name)
            _need(len(vals) > 0 and all(_is_real(g) and 0 <= g < 1 for g in vals),
                  f"`{name}` must be a non-empty list of couplings g in [0, 1), got {vals!r}.")
        _need(len(self.pairings) > 0 and set(self.pairings) <= {"main", "ctrl"},
              f"`pairings` must be a non-empty subset of ('main', 'ctrl'), got {self.pairings!r}.")
        _need(len(self.seeds) > 0 and all(_is_int(s) and s >= 0 for s in self.seeds),
              f"`seeds` must be a non-empty list of integers >= 0, got {self.seeds!r}.")
        _need_real(self, "intervention_g", lambda g: 0 <= g < 1, "in [0, 1)")
        _need_real(self, "intervention_sigma", lambda s: s >= 0, ">= 0")
        _need(len(self.taus) > 0, "`taus` must hold at least one threshold in (0, 1).")
        for t in self.taus:
            check_level(t, "taus")
        check_level(self.phi_star, "phi_star")
        check_clip(self.clip)
        _need(len(set(self.clone_classes)) == 2 and all(_is_int(c) and 0 <= c <= 9 for c in self.clone_classes),
              f"`clone_classes` must be two different digits, got {self.clone_classes!r}.")
        _need_int(self, "eval_n", "intervention_points", "scan_points", "clone_n", "clone_repeats", "classifier_steps",
                  "quality_classifier_steps")
        _need_int(self, "quality_n", least=0)
        _need(all(_is_real(g) and 0 <= g < 1 for g in self.robust_gs),
              f"`robust_gs` must be couplings g in [0, 1), got {self.robust_gs!r}.")
        _need(self.robust_T is None or (_is_int(self.robust_T) and self.robust_T >= 2),
              f"`robust_T` must be None or an integer >= 2, got {self.robust_T!r}.")
        _need(self.robust_eval_n is None or (_is_int(self.robust_eval_n) and self.robust_eval_n >= 1),
              f"`robust_eval_n` must be None or an integer >= 1, got {self.robust_eval_n!r}.")
        self.train.validate()

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return json.loads(json.dumps(d | {"train": self.train.to_json()}))

    @classmethod
    def from_json(cls, d: dict) -> SyncSweep:
        d = dict(d)
        train_cfg = TrainConfig.from_json(d.pop("train"))
        return cls(train=train_cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    # ------------------------------------------------------------------ the jobs

    def p1_jobs(self) -> list[dict]:
        """Protocol I's evaluations: one per `(g, pairing, seed)`, on the digits of `train.classes` (all: None)."""
        classes = None if self.train.classes is None else tuple(sorted(self.train.classes))
        return [self._job("p1", g, p, s, classes) for g in self.gs for p in self.pairings for s in self.seeds]

    def p2_jobs(self) -> list[dict]:
        """Protocol II's evaluations: one per `(g, seed)`, MAIN, on the two `clone_classes`."""
        classes = tuple(sorted(self.clone_classes))
        return [self._job("p2", g, "main", s, classes) for g in self.clone_gs for s in self.seeds]

    def robust_jobs(self) -> list[dict]:
        """The robustness checks of Protocol I: a `robust_T` model and a `robust_eval_n` evaluation per
        `(g, pairing, seed)` over `robust_gs x pairings x seeds`."""
        classes = None if self.train.classes is None else tuple(sorted(self.train.classes))
        jobs = []
        for g in self.robust_gs:
            for p in self.pairings:
                for s in self.seeds:
                    if self.robust_T is not None:
                        jobs.append(self._job(f"p1T{self.robust_T}", g, p, s, classes, T=self.robust_T))
                    if self.robust_eval_n is not None:
                        jobs.append(self._job(f"p1n{self.robust_eval_n}", g, p, s, classes, eval_n=self.robust_eval_n))
        return jobs

    def jobs(self) -> list[dict]:
        """Every evaluation of the sweep: Protocol I, Protocol II, the robustness checks."""
        return self.p1_jobs() + self.p2_jobs() + self.robust_jobs()

    def _job(self, protocol: str, g, pairing: str, seed, classes, *, T: int | None = None, eval_n: int | None = None) -> dict:
        # the model's name says what it was trained on, so a Protocol I MAIN model on the clone classes
        # at a coupling of both grids is trained once and evaluated by both protocols
        model = f"g{float(g):g}_{pairing}" + ("" if classes is None else "_c" + "".join(map(str, classes)))
        model += ("" if T is None else f"_T{T}") + f"_s{int(seed)}"
        return dict(name=f"{protocol}_{model}", model=model, g=float(g), pairing=pairing, seed=int(seed), classes=classes,
                    T=int(T or self.train.T), eval_n=int(eval_n or self.eval_n))

    def models(self) -> list[str]:
        """The models the sweep needs, each once, in the order they are first used."""
        return list(dict.fromkeys(j["model"] for j in self.jobs()))

    def job_config(self, job: dict) -> TrainConfig:
        return self.train.replace(g=job["g"], pairing=job["pairing"], seed=job["seed"], classes=job["classes"], T=job["T"])

    def intervention_job_g(self) -> float:
        """The coupling of the Protocol I models that get the intervention curve: the one of `gs` nearest `intervention_g`."""
        return float(min(self.gs, key=lambda g: (abs(g - self.intervention_g), g)))

    def intervention_times(self) -> list[int]:
        ts = timesteps(self.train.T)
        idx = np.unique(np.linspace(0, len(ts) - 1, self.intervention_points + 2).round().astype(int))[1:-1]
        return sorted({int(ts[i]) for i in idx} or {int(ts[len(ts) // 2])}, reverse=True)

    def scan_times(self) -> list[int]:
        ts = timesteps(self.train.T, self.clone_steps)
        idx = np.unique(np.linspace(0, len(ts) - 1, self.scan_points).round().astype(int))
        return sorted({int(ts[i]) for i in idx})


def _write_json(path: Path, data) -> None:
    """Atomic: a temporary file in the same folder, then a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "to_json"):
        return x.to_json()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _finite_or_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _p1_record(res: dict, taus, frames: int = 10) -> dict:
    gaps = {f"{tau:g}": {"gap": _finite_or_none(res["gaps"][tau]["gap"]), "t_u": res["gaps"][tau]["t_u"].to_json(),
                         "t_v": res["gaps"][tau]["t_v"].to_json()} for tau in taus}
    pick = np.unique(np.linspace(0, len(res["t"]) - 1, frames).round().astype(int))  # Figure 8's frames, noise to data
    return {"t": res["t"], "cos_u": res["cos_u"], "cos_v": res["cos_v"], "c_a": res["c_a"], "c_b": res["c_b"],
            "ghosting": res["ghosting"], "gaps": gaps,
            "trajectory": {"t": res["t"][pick], "x0": np.round(res["trajectory"][pick], 4)}}


def run_sync_sweep(sweep: SyncSweep, out_dir, *, models_dir=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the sweep into `out_dir`; see the module docstring.

    `models_dir`: evaluate models trained elsewhere (a folder with `models/<job>/` runs or the runs
    themselves); a missing run is an error naming it, nothing is trained. `stop_after`: stop after
    this many jobs have been done in this call (what a killed sweep looks like, for tests).

    **Returns:** the summary (also written to `summary.json`).
    """
    sweep.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`out_dir` {out} is an existing file, not a directory.")
    with RunLock(out, "mnist-sync sweep"):
        return _run(sweep, out, models_dir, progress, stop_after)


def _model_dir(out: Path, models_dir, job: dict) -> Path:
    name = job["model"]
    if models_dir is None:
        return out / "models" / name
    base = Path(models_dir)
    for cand in (base / "models" / name, base / name):
        if (cand / "checkpoints").is_dir():
            return cand
    raise FileNotFoundError(f"`models_dir` {base} holds no run for model {name!r} of job {job['name']!r} (looked for "
                            f"{base / 'models' / name} and {base / name}).")


def _run(sweep: SyncSweep, out: Path, models_dir, progress: bool, stop_after) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    cfg_file = out / "sweep.json"
    if cfg_file.exists():
        saved = json.loads(cfg_file.read_text())
        if saved != sweep.to_json():
            diff = sorted(k for k in set(saved) | set(sweep.to_json()) if saved.get(k) != sweep.to_json().get(k))
            raise ValueError(f"{out} holds a sweep with a different configuration (fields {diff}); use another --out.")
    else:
        _write_json(cfg_file, sweep.to_json())
    if models_dir is not None:  # every run must exist before any work
        for job in sweep.jobs():
            _model_dir(out, models_dir, job)

    p1, p2, everything = sweep.p1_jobs(), sweep.p2_jobs(), sweep.jobs()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(everything), desc="mnist-sync (jobs)", unit="job")
    done_here = 0
    shared: dict = {}

    def finished(name):
        return (out / "eval" / f"{name}.json").exists()

    def load_model(job):
        if shared.get("model", (None,))[0] == job["model"]:  # the model the last job used (Protocol I, then II)
            return shared["model"][1]
        d = _model_dir(out, models_dir, job)
        if models_dir is None:
            result = train(sweep.job_config(job), d, progress=progress)
        else:
            result = load_run(d)
            if result.config != sweep.job_config(job):
                raise ValueError(f"the run at {d} was trained with another configuration than job {job['name']!r} needs.")
        shared["model"] = (job["model"], result)
        return result

    try:
        order = sweep.models()  # the jobs of one model one after the other: it is trained or loaded once
        first = {}
        for job in sorted(everything, key=lambda j: order.index(j["model"])):
            first.setdefault(job["model"], job["name"])
            if finished(job["name"]):
                if bar is not None:
                    bar.update(1)
                continue
            if stop_after is not None and done_here >= stop_after:
                break
            result = load_model(job)
            eps_fn, schedule, noise = run_eps(result)
            rec = {"job": job, "config": result.config.to_json(), "step": result.step}
            if job not in p2:  # Protocol I and its robustness checks
                rec["protocol1"] = _p1_record(protocol1(eps_fn, schedule, noise, n=job["eval_n"], seed=job["seed"], taus=sweep.taus,
                                                        clip=sweep.clip), sweep.taus)
            if job in p1:
                if job["g"] == sweep.intervention_job_g() and job["seed"] == sweep.seeds[0]:
                    rec["intervention"] = intervention_curve(eps_fn, schedule, noise, t_ints=sweep.intervention_times(),
                                                             sigma=sweep.intervention_sigma, n=sweep.eval_n, seed=job["seed"],
                                                             clip=sweep.clip)
            if job in p2:
                if "classifiers" not in shared:
                    shared["classifiers"] = _mode_classifiers(sweep)
                clf = shared["classifiers"]
                res = protocol2(eps_fn, schedule, noise, clf, scan_t=sweep.scan_times(), n=sweep.clone_n,
                                repeats=sweep.clone_repeats, num_steps=sweep.clone_steps, seed=job["seed"], phi_star=sweep.phi_star,
                                clip=sweep.clip)
                rec["protocol2"] = res | {"classifier_accuracy": {"u": clf["test_accuracy_u"], "v": clf["test_accuracy_v"]}}
            if sweep.quality_n and first[job["model"]] == job["name"]:  # once per model
                rec["quality"] = _quality(result, sweep, shared)
            _write_json(out / "eval" / f"{job['name']}.json", rec)
            done_here += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize_sweep(sweep, out)
    summary["theory"] = _theory(sweep, shared)
    _write_json(out / "summary.json", summary)
    summary = json.loads((out / "summary.json").read_text())  # plain data, as the plots and users read it
    _write_table(out, summary)
    write_figures(summary, out, sweep)
    return summary


def write_figures(summary: dict, out, sweep: SyncSweep) -> list[Path]:
    """Figures 6-11 of what the summary holds (a figure whose jobs are missing is skipped)."""
    from .. import plotting as P

    out, written = Path(out), []
    g_show = min(sweep.gs, key=lambda g: abs(g - 0.3))  # the paper shows g = 0.3
    todo = []
    if summary["protocol1"]:
        todo += [("figure6.png", lambda: P.plot_sync_cosines(summary, g_show, sweep.taus)),
                 ("figure7.png", lambda: P.plot_ghosting(summary, g_show)),
                 ("figure8.png", lambda: P.plot_sync_trajectory(summary, g_show))]
    if summary["intervention"]:
        todo.append(("figure9.png", lambda: P.plot_intervention(summary)))
    if summary.get("theory"):
        todo.append(("gap_theory.png", lambda: P.plot_gap_theory(summary)))
    if summary["protocol2"]:
        todo += [("figure10.png", lambda: P.plot_speciation_vs_g(summary)),
                 ("figure11a.png", lambda: P.plot_excess_agreement(summary, min(sweep.clone_gs))),
                 ("figure11b.png", lambda: P.plot_excess_agreement(summary, 0.5))]
    for name, make in todo:
        try:
            fig = make()
        except ValueError:  # e.g. no MAIN job in this sweep
            continue
        fig.tight_layout()
        written.append(P.save_figure(fig, out / name, dpi=100))
    return written


def _clone_data(sweep: SyncSweep, split: str):
    from ..data.mnist import load_mnist
    from ..data.pairing import PairedMNIST

    c = sweep.train.data
    x, y = load_mnist(split, c.data_path)
    return PairedMNIST(x, y, transform=c.transform, pairing="main", classes=sweep.clone_classes)


def _theory(sweep: SyncSweep, shared: dict) -> list[dict]:
    """The closed-form per-mode speciation timesteps for Protocol II's data at every `clone_gs` ([`mode_theory`][])."""
    from ..diffusion.noise import VPSchedule
    from .mnist_sync import mode_theory

    if "clone_train" not in shared:
        shared["clone_train"] = _clone_data(sweep, "train")
    rows = mode_theory(shared["clone_train"], VPSchedule.named(sweep.train.schedule, sweep.train.T), sweep.clone_gs)
    return [{k: _finite_or_none(v) for k, v in r.items()} for r in rows]


def _mode_classifiers(sweep: SyncSweep) -> dict:
    data = {split: _clone_data(sweep, split) for split in ("train", "test")}
    return fit_mode_classifiers(data["train"], data["test"], classes=tuple(sorted(sweep.clone_classes)),
                                steps=sweep.classifier_steps, batch_size=min(128, len(data["train"])), seed=0)


def _quality(result, sweep: SyncSweep, shared: dict) -> dict:
    """`pair_quality` of `quality_n` samples, with one pair classifier per data set (transform, classes), fitted once."""
    from ..diffusion.build import build_data
    from .mnist import evaluate_run, fit_pair_classifier

    c = result.config.data
    key = ("pair_classifier", c.transform, c.classes, c.data_path, c.n_train)
    if key not in shared:
        data = build_data(dataclasses.replace(c, pairing="main"))
        shared[key] = fit_pair_classifier(data, steps=sweep.quality_classifier_steps, batch_size=min(256, len(data)), seed=0)
    q = evaluate_run(result, sweep.quality_n, seed=0, classifier=shared[key], clip=sweep.clip)
    return {"recognisable": q["samples"]["recognisable"], "real_recognisable": q["real"]["recognisable"],
            "class_entropy": q["samples"]["class_entropy"], "classifier_test_accuracy": q["classifier_test_accuracy"]}


def summarize_sweep(sweep: SyncSweep, out) -> dict:
    """Table 1 (mean and sd of the gaps over seeds, with the number of seeds in which both modes
    crossed), its robustness rows (`T`, `eval_n`), the intervention curves, Protocol II's
    speciation times and the sample quality, from the evaluations present in `<out>/eval/`."""
    out = Path(out)
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}

    def row(jobs, g, pairing, **extra):
        recs = [evals[j["name"]] for j in jobs if j["g"] == g and j["pairing"] == pairing and j["name"] in evals]
        out_row = {"g": g, "pairing": pairing} | extra
        for tau in sweep.taus:
            cells = [r["protocol1"]["gaps"][f"{tau:g}"] for r in recs]
            got = [c["gap"] for c in cells if c["gap"] is not None]
            statuses = [c[m]["status"] for c in cells for m in ("t_u", "t_v") if c[m]["status"] != "crossed"]
            out_row[f"{tau:g}"] = {"mean": float(np.mean(got)) if got else None,
                                   "sd": float(np.std(got, ddof=1)) if len(got) > 1 else None,
                                   "n_crossed": len(got), "n_seeds": len(recs),
                                   "not_crossed": {s: statuses.count(s) for s in sorted(set(statuses))}}
        return out_row

    table = [row(sweep.p1_jobs(), g, p) for g in sweep.gs for p in sweep.pairings]
    robust = sweep.robust_jobs()
    robustness = [row([j for j in robust if j["name"].startswith(kind)], g, p, T=T, eval_n=n)
                  for kind, T, n in ((f"p1T{sweep.robust_T}_", sweep.robust_T, sweep.eval_n),
                                     (f"p1n{sweep.robust_eval_n}_", sweep.train.T, sweep.robust_eval_n))
                  if any(j["name"].startswith(kind) for j in robust)
                  for g in sweep.robust_gs for p in sweep.pairings]
    interventions = {e["job"]["pairing"]: e["intervention"] for e in evals.values() if "intervention" in e}
    clones = [{"g": e["job"]["g"], "seed": e["job"]["seed"]} | {k: e["protocol2"][k] for k in (
        "t", "t_spec_u", "t_spec_v", "t_spec_u_band", "t_spec_v_band", "gap", "ex_u", "ex_v", "phi_indep_u", "phi_indep_v",
        "n_pairs", "classifier_accuracy")} for e in evals.values() if "protocol2" in e]
    curves = {name: {"g": e["job"]["g"], "pairing": e["job"]["pairing"], "seed": e["job"]["seed"]}
              | {k: e["protocol1"][k] for k in ("t", "cos_u", "cos_v", "c_a", "c_b", "ghosting", "trajectory")}
              for name, e in evals.items() if name in {j["name"] for j in sweep.p1_jobs()}}
    quality = {name: e["quality"] for name, e in evals.items() if "quality" in e}
    jobs = [j["name"] for j in sweep.jobs()]
    return {"table1": table, "robustness": robustness, "intervention": interventions, "protocol2": clones, "quality": quality,
            "protocol1": curves, "complete": all(j in evals for j in jobs), "missing": [j for j in jobs if j not in evals]}


def _write_table(out: Path, summary: dict) -> None:
    _write_json(out / "table1.json", summary["table1"])  # the robustness rows are in summary.json
    rows = summary["table1"]
    taus = [k for k in rows[0] if k not in ("g", "pairing")] if rows else []

    def cells(row):
        got = []
        for t in taus:
            c = row[t]
            why = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in c.get("not_crossed", {}).items())
            if c["mean"] is None:
                got.append(f"no gap in {c['n_seeds']} seed(s): {why}")
            else:
                sd = f" +- {c['sd']:.1f}" if c["sd"] is not None else ""
                got.append(f"{c['mean']:.1f}{sd}" + ("" if c["n_crossed"] == c["n_seeds"] else
                                                     f" ({c['n_crossed']} of {c['n_seeds']} seeds; {why})"))
        return " | ".join(got)

    head = " | ".join(f"Delta t({t})" for t in taus)
    lines = [f"| g | pairing | {head} |", "|---|---|" + "---|" * len(taus)]
    lines += [f"| {row['g']:g} | {row['pairing'].upper()} | {cells(row)} |" for row in rows]
    if summary.get("robustness"):
        lines += ["", "Robustness (Protocol I with a longer horizon T, or a larger evaluation batch):", "",
                  f"| g | pairing | T | batch | {head} |", "|---|---|---|---|" + "---|" * len(taus)]
        lines += [f"| {row['g']:g} | {row['pairing'].upper()} | {row['T']} | {row['eval_n']} | {cells(row)} |"
                  for row in summary["robustness"]]
    (out / "table1.md").write_text("\n".join(lines) + "\n")
