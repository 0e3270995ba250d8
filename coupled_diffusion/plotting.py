"""Matplotlib drawings of the experiments' data dicts.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so importing or
calling this module selects no backend and registers no global figure: a figure is saved with
[`save_figure`][] (or `fig.savefig`) and shown in a notebook by displaying it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _figure(figsize=(5.2, 3.8), dpi=120) -> Figure:
    return Figure(figsize=figsize, dpi=dpi)


def _fig():
    fig = _figure()
    return fig, fig.subplots()


def save_figure(fig: Figure, path, **savefig_kwargs) -> Path:
    """Write `fig` to `path` (the format from its suffix) and return the path."""
    path = Path(path)
    fig.savefig(path, **savefig_kwargs)
    return path


def plot_figure1(d):
    fig, ax = _fig()
    ax.plot(d["g"], d["common_mode"], "-", label="common mode only (eq 66)")
    ax.plot(d["g"], d["difference_mode"], "--", label="difference mode only (eq 66)")
    ax.plot(d["g"], d["mixture_theta_pi_3"], ":", label=r"mixture $\theta=\pi/3$ (numerical)")
    ax.plot(d["g"], d["mixture_theta_2pi_3"], "-.", label=r"mixture $\theta=2\pi/3$ (numerical)")
    ax.set(xlabel="coupling g", ylabel="speciation time $t_S$", title="Figure 1: speciation vs coupling (symmetric M)")
    ax.legend(fontsize=7)
    return fig


def plot_figure2(d):
    fig, ax = _fig()
    ax.plot(d["g"], d["joint"], "-k", label="joint $t_C$ (eq 73)")
    ax.plot(d["g"], d["common_mode"], "-", label="common mode $t_{C+}$ (eq 78)")
    ax.plot(d["g"], d["difference_mode"], "--", label="difference mode $t_{C-}$ (eq 78)")
    ax.set(xlabel="coupling g", ylabel="collapse time", title=r"Figure 2: collapse vs coupling ($\alpha=1$)")
    ax.legend(fontsize=7)
    return fig


def plot_figure3(d):
    fig, ax = _fig()
    ax.plot(d["g"], d["t_s"], "-")
    ax.set(xlabel="coupling g", ylabel="speciation time $t_S$",
           title=r"Figure 3: anisotropic M, $\mu_x = 0$, $m_y^2 = 2$")
    return fig


def plot_figure4(d):
    fig, ax = _fig()
    t = np.ma.masked_invalid(d["t_s"])
    mesh = ax.pcolormesh(d["g"], d["theta"], t, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="$t_S$ (white: no speciation)")
    gc = np.where(np.isfinite(d["g_crit"]) & (d["g_crit"] <= d["g"][-1]), d["g_crit"], np.nan)
    ax.plot(gc, d["theta"], "b--", label=r"$g_{crit}(\theta)$ from $\kappa(0)=1$ (eq 85)")
    ax.set(xlabel="coupling g", ylabel=r"angle $\theta$", title="Figure 4: speciation phase diagram")
    ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_figure5(d):
    fig, ax = _fig()
    ax.plot(d["g"], d["joint"], "-", label="joint $t_C$ (eq 86)")
    ax.plot(d["g"], d["conditional"], "--", label="conditional $t_{C,y|x}$ (eq 87)")
    ax.set(xlabel="coupling g", ylabel="collapse time", title=r"Figure 5: anisotropic collapse ($\alpha=1$)")
    ax.legend(fontsize=7)
    return fig


PLOTTERS = {"figure1": plot_figure1, "figure2": plot_figure2, "figure3": plot_figure3,
            "figure4": plot_figure4, "figure5": plot_figure5}


def plot_conditional(d, g0):
    """Figures 12-14: Delta accuracy / MSE / NLL vs theta for one coupling strength `g0`."""
    fig = _figure((13, 3.8), 110)
    axes = fig.subplots(1, 3)
    theta = np.asarray(d["theta"])
    labels = {"d_acc": r"$\Delta$ accuracy", "d_mse": r"$\Delta$ MSE (eq 145)", "d_nll": r"$\Delta$ NLL (eq 146)"}
    for name, run in d["runs"].items():
        sched, g = name.split("/g0=")
        if float(g) != float(g0):
            continue
        for ax, m in zip(axes, labels):
            ax.errorbar(theta, run[m], yerr=2 * np.asarray(run["se_" + m[2:]]), marker="o", ms=3, capsize=2, label=sched)
    for ax, m in zip(axes, labels):
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set(xlabel=r"$\theta$", ylabel=labels[m])
        ax.legend(fontsize=7)
    fig.suptitle(rf"Appendix C: coupling $g_0 = {g0}$ vs the uncoupled baseline (bars: 2 paired SE)")
    return fig


def plot_cloning(d):
    """Clone agreement vs branch time per dimension, with the exact curve and the kappa-based t_S."""
    fig, ax = _fig()
    for i, (dim, c) in enumerate(d["curves"].items()):
        color = f"C{i}"
        t = np.asarray(c["t_branch"])
        a = np.asarray(c["agreement"])
        ax.errorbar(t, a, yerr=[a - np.asarray(c["lower"]), np.asarray(c["upper"]) - a], fmt="o", ms=3, color=color,
                    label=f"d = {dim} (sampled)")
        ax.plot(t, c["theory"], "-", color=color, lw=1)
        ax.axvline(c["t_s_kappa"], color=color, ls=":", lw=1)
    ax.set(xlabel="branch time t", ylabel="clone agreement", title=r"Cloning ($k=1$): lines exact, dotted $d\kappa(t_S)=1$")
    ax.legend(fontsize=7)
    return fig


def plot_memorization(d):
    fig, ax = _fig()
    for i, row in enumerate(d["cases"]):
        ax.semilogx(row["t"], row["fraction"], "-o", ms=2, color=f"C{i}", label=f"d={row['d']}, n={row['n']}")
        ax.axvline(row["t_collapse"], color=f"C{i}", ls=":", lw=1)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set(xlabel="t", ylabel=r"fraction with $\max_i w_i > 1/2$", title="Memorisation (dotted: REM collapse time)")
    ax.legend(fontsize=7)
    return fig


def plot_schedule_opt(d):
    """Per angle: the learned g(t), and every schedule's (Delta NLL, Delta accuracy) on the test set."""
    runs = d["runs"]
    fig = _figure((9.5, 3.4 * len(runs)), 120)
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, run in zip(axes, runs):
        ax = row[0]
        ax.plot(run["knots"], run["values"], "o-", color="k", label="learned")
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set(xlabel="t", ylabel="g(t)", title=rf"learned schedule, $\theta$ = {run['theta']:.3f}")
        ax.legend(fontsize=7)
        ax = row[1]
        for name, r in run["validation"].items():
            if name == "baseline":
                continue
            learned = name == "learned"
            family = name.split("/")[0]
            color = "k" if learned else {"const": "C0", "late": "C1", "early": "C2"}[family]
            ax.errorbar(r["d_nll"], r["d_acc"], xerr=2 * r["se_nll"], yerr=2 * r["se_acc"], fmt="*" if learned else "o",
                        ms=9 if learned else 4, color=color, label=family if (learned or "0.2" in name) else None)
            if not learned:
                ax.annotate(name.split("=")[1], (r["d_nll"], r["d_acc"]), fontsize=6, color=color)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.axvline(0.0, color="gray", lw=0.5)
        ax.set(xlabel=r"$\Delta$ NLL (validation, $\pm 2$ se)", ylabel=r"$\Delta$ accuracy",
               title=f"best grid: {run['best']}\n(test) beats it: {run['beats_best']}; no harm: {run['no_harm']}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    return fig


def plot_loss(history: list[dict]) -> Figure:
    """The training loss (eq 96) per logged step of a run's history (`TrainResult.history`)."""
    fig = _figure((6, 3.5), 100)
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel="loss (eq 96)", yscale="log")
    fig.tight_layout()
    return fig


def plot_pair_grid(x) -> Figure:
    """Two-channel images `x` `(n, 28, 28, 2)` in [0, 1] as four rows: x_A, x_B, u = (x_A + x_B)/2 and
    v = (x_A - x_B)/sqrt 2 (eq 103), one column per image."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    rows = {"x_A": x[..., 0], "x_B": x[..., 1], "u": (x[..., 0] + x[..., 1]) / 2, "v": (x[..., 0] - x[..., 1]) / np.sqrt(2)}
    fig = _figure((n * 0.8, 4 * 0.85), 100)
    axes = fig.subplots(4, n, squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        signed = name == "v"
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(imgs[i], cmap="RdBu_r" if signed else "gray", vmin=-0.8 if signed else 0, vmax=0.8 if signed else 1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------ the Section 5 sweep (summary.json)


def _pick(curves: dict, g: float, pairing: str = "main") -> dict:
    """The curves of the job nearest to coupling `g` with this pairing (the first seed)."""
    cands = [c for c in curves.values() if c["pairing"] == pairing]
    if not cands:
        raise ValueError(f"no Protocol I curves with pairing {pairing!r} in the summary.")
    best = min(abs(c["g"] - g) for c in cands)
    return min((c for c in cands if abs(c["g"] - g) == best), key=lambda c: c["seed"])


def plot_sync_cosines(summary: dict, g: float = 0.3, taus=(0.90, 0.95, 0.98)) -> Figure:
    """Figure 6: Cos_u(t) and Cos_v(t) (eq 98) against the reverse timestep, MAIN and CTRL, thresholds dotted."""
    fig, ax = _fig()
    for pairing, ls in (("main", "-"), ("ctrl", "--")):
        try:
            c = _pick(summary["protocol1"], g, pairing)
        except ValueError:
            continue
        ax.plot(c["t"], c["cos_u"], ls, color="C0", label=f"u, {pairing.upper()}")
        ax.plot(c["t"], c["cos_v"], ls, color="C3", label=f"v, {pairing.upper()}")
    for tau in taus:
        ax.axhline(tau, color="gray", ls=":", lw=0.8)
    ax.invert_xaxis()
    ax.set(xlabel="reverse timestep t", ylabel=r"Cos$_m(t)$ to the final $\hat z_0$", title=f"Protocol I, g = {c['g']:g}")
    ax.legend(fontsize=7)
    return fig


def plot_ghosting(summary: dict, g: float = 0.3, pairing: str = "main") -> Figure:
    """Figure 7: c_u, c_A, c_B (eq 107) and the ghosting index GI = 2 c_u - c_A - c_B (eq 108)."""
    c = _pick(summary["protocol1"], g, pairing)
    fig, ax = _fig()
    for key, label in (("cos_u", "$c_u$"), ("c_a", "$c_A$"), ("c_b", "$c_B$"), ("ghosting", "GI")):
        ax.plot(c["t"], c[key], label=label, lw=2 if key == "ghosting" else 1)
    ax.axhline(0, color="gray", lw=0.6)
    ax.invert_xaxis()
    ax.set(xlabel="reverse timestep t", ylabel="cosine to the final frame", title=f"Ghosting, {pairing.upper()} g = {c['g']:g}")
    ax.legend(fontsize=7)
    return fig


def plot_sync_trajectory(summary: dict, g: float = 0.3, pairing: str = "main") -> Figure:
    """Figure 8: x_A, x_B and u = (x_A + x_B)/2 of the predicted clean state along one trajectory (noise to data)."""
    c = _pick(summary["protocol1"], g, pairing)
    x = (np.asarray(c["trajectory"]["x0"], np.float64) + 1) / 2
    ts = c["trajectory"]["t"]
    n = len(ts)
    fig = _figure((n * 0.8, 3 * 0.9), 100)
    axes = fig.subplots(3, n, squeeze=False)
    rows = {"x_A": x[..., 0], "x_B": x[..., 1], "u": (x[..., 0] + x[..., 1]) / 2}
    for r, (name, imgs) in enumerate(rows.items()):
        for i in range(n):
            axes[r, i].imshow(np.clip(imgs[i], 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[r, i].set_xticks([]), axes[r, i].set_yticks([])
            if r == 0:
                axes[r, i].set_title(f"t={ts[i]}", fontsize=7)
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    return fig


def plot_intervention(summary: dict) -> Figure:
    """Figure 9 as a curve: RMS change of the final u and v after noise injected into v at t_int (eq 101)."""
    fig, ax = _fig()
    for pairing, ls in (("main", "-o"), ("ctrl", "--s")):
        rows = summary["intervention"].get(pairing)
        if not rows:
            continue
        t = [r["t_int"] for r in rows]
        ax.plot(t, [r["rms_u"] for r in rows], ls, ms=3, color="C0", label=rf"RMS $\Delta u$, {pairing.upper()}")
        ax.plot(t, [r["rms_v"] for r in rows], ls, ms=3, color="C3", label=rf"RMS $\Delta v$, {pairing.upper()}")
    ax.invert_xaxis()
    ax.set(xlabel=r"intervention timestep $t_{int}$", ylabel="RMS change of the final image", title="Intervention in v (eq 101)")
    ax.legend(fontsize=7)
    return fig


def plot_speciation_vs_g(summary: dict) -> Figure:
    """Figure 10: t_u^spec and t_v^spec (eq 106) against g, with the crossings of the Wilson band as intervals."""
    fig, ax = _fig()
    rows = sorted(summary["protocol2"], key=lambda r: (r["g"], r["seed"]))
    for m, color, dx in (("u", "C0", -0.004), ("v", "C3", 0.004)):
        for r in rows:
            c, (lo, hi) = r[f"t_spec_{m}"], r[f"t_spec_{m}_band"]
            if c["time"] is None:
                continue
            err = [[c["time"] - lo["time"]] if lo["time"] is not None else [0], [hi["time"] - c["time"]] if hi["time"] is not None else [0]]
            ax.errorbar([r["g"] + dx], [c["time"]], yerr=err, fmt="o", ms=4, color=color, capsize=2)
        ax.plot([], [], "o", color=color, label=rf"$t_{m}^{{spec}}$")
    missing = [f"{m} at g = {r['g']:g}: {r[f't_spec_{m}']['status'].replace('_', ' ')}" for r in rows for m in "uv"
               if r[f"t_spec_{m}"]["time"] is None]
    if missing:
        ax.text(0.02, 0.02, "not crossed: " + "; ".join(missing), transform=ax.transAxes, fontsize=6, wrap=True)
    ax.set(xlabel="coupling g", ylabel=r"speciation timestep ($\phi^{ex} = \phi^\star$)", title="Protocol II (eq 106)")
    ax.legend(fontsize=7)
    return fig


def plot_excess_agreement(summary: dict, g: float) -> Figure:
    """Figure 11: phi_u^ex(t) and phi_v^ex(t) (eq 105) with the mapped Wilson bands, at the coupling nearest `g`."""
    rows = summary["protocol2"]
    best = min(abs(r["g"] - g) for r in rows)
    r = min((r for r in rows if abs(r["g"] - g) == best), key=lambda r: r["seed"])
    fig, ax = _fig()
    for m, color in (("u", "C0"), ("v", "C3")):
        ex = r[f"ex_{m}"]
        ax.plot(r["t"], ex["value"], "-o", ms=3, color=color, label=rf"$\phi^{{ex}}_{m}$")
        ax.fill_between(r["t"], ex["lower"], ex["upper"], color=color, alpha=0.2)
    ax.invert_xaxis()
    ax.set(xlabel="reverse timestep t (clone start)", ylabel=r"$\phi^{ex}_m(t)$", title=f"Cloning agreement, g = {r['g']:g}")
    ax.legend(fontsize=7)
    return fig


def plot_gap_theory(summary: dict) -> Figure:
    """Predicted (closed-form per-mode theory) and measured (Protocol II) gaps t_v^spec - t_u^spec against g."""
    fig, ax = _fig()
    th = sorted(summary["theory"], key=lambda r: r["g"])
    ax.plot([r["g"] for r in th], [r["gap"] if r["gap"] is not None else np.nan for r in th], "-", color="k",
            label="theory: $t_v - t_u$ (per-mode OU, $d\\kappa = 1$)")
    got = [(r["g"], r["gap"]) for r in summary["protocol2"] if r["gap"] is not None]
    if got:
        ax.plot(*zip(*got), "o", color="C2", label=r"measured: $t_v^{spec} - t_u^{spec}$")
    missing = sorted({r["g"] for r in summary["protocol2"] if r["gap"] is None})
    if missing:
        ax.text(0.02, 0.02, f"no measured gap at g = {', '.join(f'{g:g}' for g in missing)}", transform=ax.transAxes, fontsize=7)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(xlabel="coupling g", ylabel="gap (timesteps; < 0: u first)", title="Synchronization gap: theory and cloning")
    ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------------ dit-sync (DiT paper)


def _sigmoid_curve(params, k):
    a, b, t0, w = params
    return a + b / (1 + np.exp(-(k - t0) / w))


def _grid(n: int, width: float = 3.2, height: float = 2.6):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(figsize=(width * cols, height * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _fit_panel(ax, k, fit, color, label):
    k = np.asarray(k, float)
    ax.fill_between(k, fit["q25"], fit["q75"], color=color, alpha=0.2, lw=0)
    ax.plot(k, fit["median"], "o", ms=3, color=color, label=f"{label} median")
    if np.all(np.isfinite(fit["params"])):
        kk = np.linspace(k[0], k[-1], 200)
        ax.plot(kk, _sigmoid_curve(fit["params"], kk), "-", color=color, lw=1)
    if np.isfinite(fit["midpoint"]):
        ax.axvline(fit["midpoint"], color=color, ls="--", lw=0.8)
        lo, hi = fit["ci"]
        if np.isfinite(lo) and np.isfinite(hi):
            ax.axvspan(max(lo, k[0]), min(hi, k[-1]), color=color, alpha=0.08)


def plot_dit_cosine(summary: dict) -> Figure:
    """Figures 2-4: Protocol I's feature cosine (eq 70) against the coupled steps k, per g: median and
    quartiles over seeds, the sigmoid fit, its midpoint and 95% bootstrap interval."""
    p1 = summary["protocol1"]
    fig, axes = _grid(len(p1))
    for ax, (g, r) in zip(axes, p1.items(), strict=False):
        _fit_panel(ax, r["k"], r["cosine"], "C0", "cosine")
        ax.set(title=f"g = {g}: k* = {r['cosine']['midpoint']:.1f}", xlabel="coupled steps k", ylabel="feature cosine")
    fig.tight_layout()
    return fig


def plot_dit_control(summary: dict) -> Figure:
    """Figure 5: the uncoupled control (g = 0, shared noise for the first k steps)."""
    fig, ax = _fig()
    c = summary["control"]
    _fit_panel(ax, c["k"], c["cosine"], "C2", "cosine")
    ax.set(title=f"control, shared noise until k: k* = {c['cosine']['midpoint']:.1f}", xlabel="shared-noise steps k",
           ylabel="feature cosine")
    return fig


def plot_dit_coarse_fine(summary: dict) -> Figure:
    """Figures 6-8: coarse (blue) and fine (red) agreement (eq 71-72) against k, per g, with their midpoints."""
    p1 = summary["protocol1"]
    fig, axes = _grid(len(p1))
    for ax, (g, r) in zip(axes, p1.items(), strict=False):
        _fit_panel(ax, r["k"], r["coarse"], "C0", "coarse")
        _fit_panel(ax, r["k"], r["fine"], "C3", "fine")
        ax.set(title=f"g = {g}: gap {r['gap']:.1f} steps", xlabel="coupled steps k", ylabel="cosine")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_dit_depth(summary: dict) -> Figure:
    """Figures 1, 9, 10: per block, the leading and trailing band energies (mean and spread over seeds)
    at the speciation step, per Protocol II coupling, and R (eq 80) on a second axis."""
    p2 = summary["protocol2"]
    fig, axes = _grid(len(p2))
    for ax, (g, r) in zip(axes, p2.items(), strict=False):
        blocks = np.arange(1, len(r["R"]) + 1)
        for name, color in (("lead", "C0"), ("trail", "C3")):
            m, s = np.asarray(r[f"{name}_mean"]), np.asarray(r[f"{name}_std"])
            ax.plot(blocks, m, "o-", ms=3, color=color, label="leading band" if name == "lead" else "trailing band")
            ax.fill_between(blocks, np.maximum(m - s, 1e-6), m + s, color=color, alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(blocks, r["R"], "k:", lw=1)
        ax2.set_ylabel("R (dotted)", fontsize=7)
        ax.set(title=f"g = {g}, step {r['step']}", xlabel="block", ylabel="normalised energy")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_dit_time(summary: dict) -> Figure:
    """R (eq 80) in the last block along the Protocol II trajectory, per coupling."""
    fig, ax = _fig()
    for g, r in summary["protocol2"].items():
        ax.plot(np.arange(len(r["R_time_last"])), r["R_time_last"], label=f"g = {g}")
    ax.axhline(1, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set(xlabel="reverse step k", ylabel="R in the last block", title="Protocol II over the trajectory")
    ax.legend(fontsize=7)
    return fig


_PATTERN_LABELS = {"gaussian": "Gaussian patch", "two_cluster": "two-cluster patch", "patch_empirical": "empirical patch",
                   "full_empirical": "full empirical"}


def plot_pattern_rates(d: dict) -> Figure:
    """Per patch model: the top-branch growth rate of each |q| shell over t (colour, zero contour), t_c dashed."""
    names = [n for n in ("gaussian", "two_cluster", "patch_empirical") if n in d["models"]]
    fig = _figure((4.0 * len(names), 3.4), 120)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    t = np.asarray(d["times"], float)
    for ax, name in zip(axes, names, strict=True):
        m = d["models"][name]
        rates = np.asarray(m["shell_rates"], float)  # (times, shells)
        q = 2 * np.pi * np.sqrt(np.asarray(m["shell_n2"], float)) / d["params"]["side"]
        lim = np.nanmax(np.abs(np.clip(rates, -2, 2)))
        mesh = ax.pcolormesh(t, q, np.clip(rates, -2, 2).T, cmap="RdBu_r", vmin=-lim, vmax=lim, shading="nearest")
        if np.nanmin(rates) < 0 < np.nanmax(rates):
            ax.contour(t, q, rates.T, levels=[0.0], colors="k", linewidths=0.8)
        if m.get("t_c") is not None:
            ax.axvline(m["t_c"], color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set(xlabel="forward time t", ylabel="|q|", title=f"{_PATTERN_LABELS[name]}: t_c = "
               + (f"{m['t_c']:.3f}" if m.get("t_c") is not None else "none"))
        fig.colorbar(mesh, ax=ax, label="growth rate (clipped to [-2, 2])")
    return fig


def plot_pattern_xi(d: dict) -> Figure:
    """xi(t) of z_t and of x0-hat for each sampler with jackknife errors, the Ginzburg-Landau prediction, t_c dashed."""
    fig = _figure((10.0, 3.6), 120)
    ax_z, ax_x = fig.subplots(1, 2)
    t = np.asarray(d["save_times"], float)
    for i, (name, m) in enumerate(d["models"].items()):
        c = f"C{i}"
        for ax, key in ((ax_z, "xi_z"), (ax_x, "xi_x0")):
            y = np.asarray(m[key], float)
            ax.errorbar(t, y, yerr=np.asarray(m[key + "_err"], float), fmt="o-", ms=3, lw=1, color=c, label=_PATTERN_LABELS[name])
            if m.get("t_c") is not None:
                ax.axvline(m["t_c"], color=c, ls="--", lw=1)
        if "gl_xi_at_save" in m:
            ax_z.plot(t, np.asarray(m["gl_xi_at_save"], float), ":", color=c, lw=1.5, label=f"{_PATTERN_LABELS[name]}: GL sqrt(c/|r|)")
    for ax, what in ((ax_z, "$z_t$"), (ax_x, r"$\hat x_0(z_t)$")):
        ax.set_xscale("log")
        ax.set(xlabel="forward time t", ylabel=r"second-moment $\xi$ (pixels)", title=f"correlation length of {what}")
        ax.set_ylim(0, max(4.0, min(12.0, ax.get_ylim()[1])))
    ax_z.legend(fontsize=6)
    return fig


def plot_pattern_samples(d: dict) -> Figure:
    """Training digits and each sampler's final samples, one row each."""
    rows = [("training", np.asarray(d["training_examples"]))] + [(n, np.asarray(s)) for n, s in d["samples"].items()]
    cols = min(8, min(len(r[1]) for r in rows))
    fig = _figure((1.1 * cols, 1.2 * len(rows)), 120)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(cols):
            axes[r, c].imshow(imgs[c], cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(_PATTERN_LABELS.get(name, name), fontsize=6)
    return fig


def plot_network_rates(net: dict) -> Figure:
    """A trained network's small-|q| shell rates (about the mean state) over OU time with t_c dashed, and (when
    measured) xi(t) of its samples' z_t and x0-hat."""
    has_xi = "xi_z" in net
    fig = _figure((10.0 if has_xi else 5.2, 3.8), 120)
    axes = np.atleast_1d(fig.subplots(1, 2 if has_xi else 1))
    ax = axes[0]
    s = np.asarray(net["ou_times"], float)
    rates = np.asarray(net["shell_rates"], float)
    for j, n2 in enumerate(np.asarray(net["shell_n2"])):
        ax.semilogx(s, rates[:, j], "o-", ms=2, lw=1, label=f"|n|^2 = {int(n2)}")
    if "annealed_top" in net:
        ax.semilogx(np.asarray(net["xi_ou_times"], float), np.asarray(net["annealed_top"], float), "k^-", ms=3, lw=1.5,
                    label="top rate, mean J over samples")
        if net.get("annealed_t_c") is not None:
            ax.axvline(net["annealed_t_c"], color="k", ls=":", lw=1)
    ax.axhline(0, color="k", lw=0.5)
    if net.get("t_c") is not None:
        ax.axvline(net["t_c"], color="k", ls="--", lw=1)
    ax.set_ylim(max(ax.get_ylim()[0], -5.0), ax.get_ylim()[1])
    ax.set(xlabel=r"OU time $s = -\frac{1}{2}\log\bar\alpha$", ylabel="growth rate (Fourier diagonal of J)",
           title="mode rates about the mean state")
    ax.legend(fontsize=6)
    if has_xi:
        ax = axes[1]
        t = np.asarray(net["xi_ou_times"], float)
        for key, label in (("xi_z", "$z_t$"), ("xi_x0", r"$\hat x_0$")):
            ax.errorbar(t, np.asarray(net[key], float), yerr=np.asarray(net[key + "_err"], float), fmt="o-", ms=3, lw=1, label=label)
        if net.get("t_c") is not None:
            ax.axvline(net["t_c"], color="k", ls="--", lw=1)
        ax.set(xscale="log", xlabel="OU time s", ylabel=r"second-moment $\xi$ (pixels)", title="correlation length of samples")
        ax.legend(fontsize=7)
    return fig


def plot_guidance(g: dict) -> Figure:
    """The guidance comparison: accuracy, recognisability and diversity per condition with 95% intervals, and one
    sample per digit for each condition."""
    names = list(g["conditions"])
    fig = _figure((11.0, 3.2 + 1.1 * len(names)), 120)
    grid = fig.add_gridspec(1 + len(names), 3, height_ratios=[3.0] + [1.0] * len(names))
    for col, (metric, label) in enumerate((("accuracy", "class accuracy"), ("recognisable", "recognisable (p >= 0.9)"),
                                           ("diversity", "diversity (feature distance)"))):
        ax = fig.add_subplot(grid[0, col])
        vals = [g["conditions"][n][metric] for n in names]
        lo = [g["conditions"][n][metric + "_ci"][0] for n in names]
        hi = [g["conditions"][n][metric + "_ci"][1] for n in names]
        ax.errorbar(range(len(names)), vals, yerr=[np.maximum(np.subtract(vals, lo), 0), np.maximum(np.subtract(hi, vals), 0)], fmt="o",
                    capsize=3)  # a bootstrap percentile interval need not contain the estimate
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set(title=label)
    p = g["params"]
    fig.suptitle(f"guidance at t_c = {p['t_c']:.3f} (window {p['window'][0]:.2f}-{p['window'][1]:.2f}, scale {p['scale']}, "
                 f"constant {p['constant_scale']:.3f})", fontsize=9)
    for r, n in enumerate(names):
        row = np.concatenate(list(np.asarray(g["samples"][n])), axis=1)
        ax = fig.add_subplot(grid[1 + r, :])
        ax.imshow(row, cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(n, fontsize=7)
    return fig


def plot_mixture_rates(mix: dict) -> Figure:
    """The exact Gaussian-mixture model's top growth rate about the mean state over OU time, with t_c and the
    guidance windows (pulse at t_c, controls) shaded."""
    fig = _figure((5.6, 3.6), 120)
    ax = fig.subplots()
    s, top = np.asarray(mix["rates"]["s"], float), np.asarray(mix["rates"]["top"], float)
    ax.plot(s, np.sign(top) * np.log1p(np.abs(top)), "o-", ms=2, lw=1)
    ax.axhline(0, color="k", lw=0.5)
    if mix.get("t_c") is not None:
        ax.axvline(mix["t_c"], color="k", ls="--", lw=1, label=f"t_c = {mix['t_c']:.3f}")
    g = mix.get("guidance", {})
    if "params" in g:
        w = g["params"]["window"]
        ax.axvspan(w[0], w[1], color="C1", alpha=0.25, label="pulse window")
        for c in g["params"].get("controls", []):
            ax.axvspan(max(c - (w[1] - w[0]) / 2, 0), c + (w[1] - w[0]) / 2, color="C2", alpha=0.15)
    ax.set(xlabel="OU time s", ylabel="sign(r) log(1 + |r|), top rate r", title="exact Gaussian-mixture digits: top drift rate")
    ax.legend(fontsize=7)
    return fig


def plot_modality_times(data: dict, fraction: float = 0.5) -> Figure:
    """Every eigenmode's speciation time against k, one panel per coupling graph, at the coupling `fraction` of
    the positive end of each graph's stability interval; colour: the mode's eigenvalue rank (0 = slowest)."""
    graphs = list(data["results"])
    fig = _figure((3.2 * len(graphs), 3.4), 120)
    axes = np.atleast_1d(fig.subplots(1, len(graphs), sharey=True))
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, graph in zip(axes, graphs):
        for k, r in data["results"][graph].items():
            k = int(k)
            j = int(np.argmin(np.abs(np.asarray(r["fraction"], float) - fraction)))
            t = np.asarray(r["t_speciation"], float)[j]
            ax.scatter(np.full(k, k), t, c=[cmap(i / max(k - 1, 1)) for i in range(k)], s=8)
        ax.set(title=f"{graph} (g = {fraction:g} g_max)", xlabel="modalities k")
    axes[0].set_ylabel("mode speciation time t_i")
    return fig


def plot_modality_spread(data: dict) -> Figure:
    """The spread of commitment times (first minus last speciating mode) against k for each graph and coupling
    fraction, and against the spectral width lambda_1 - lambda_k and gap lambda_1 - lambda_2 over the sweep."""
    fig = _figure((13.5, 3.8), 120)
    ax, bx, cx = fig.subplots(1, 3)
    for c, graph in enumerate(data["results"]):
        res = data["results"][graph]
        for frac, ls in ((0.5, "-"), (0.95, "--"), (-0.5, ":")):
            ks, sp = [], []
            for k, r in res.items():
                j = int(np.argmin(np.abs(np.asarray(r["fraction"], float) - frac)))
                if np.isfinite(r["spread"][j]):
                    ks.append(int(k))
                    sp.append(float(r["spread"][j]))
            ax.plot(ks, sp, ls, color=f"C{c}", marker="o", ms=2, lw=1, label=f"{graph}, {frac:g} of {'g_max' if frac > 0 else 'g_min'}")
        for x, key in ((bx, "spectral_width"), (cx, "spectral_gap")):
            x.scatter(np.concatenate([np.asarray(r[key], float) for r in res.values()]),
                      np.concatenate([np.asarray(r["spread"], float) for r in res.values()]), s=3, color=f"C{c}", label=graph, alpha=0.5)
    ax.set(xlabel="modalities k", ylabel="spread of commitment times", title="first minus last mode speciation")
    ax.legend(fontsize=5, ncol=2)
    bx.set(xlabel=r"spectral width $\lambda_1 - \lambda_k$", ylabel="spread", title="spread against the spectral width")
    cx.set(xlabel=r"spectral gap $\lambda_1 - \lambda_2$", ylabel="spread", title="spread against the gap")
    bx.legend(fontsize=6)
    return fig
