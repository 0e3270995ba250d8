"""The `coupled-diffusion` command: thin wrappers over `experiments/`."""

import argparse
import json
import pathlib
import sys
import time


def _to_json(d):
    import numpy as np

    out = {}
    for key, val in d.items():
        if isinstance(val, np.ndarray):
            out[key] = [None if not np.isfinite(x) else float(x) for x in val.ravel()] if val.ndim == 1 else [
                [None if not np.isfinite(x) else float(x) for x in row] for row in val
            ]
        else:
            out[key] = val
    return out


def cmd_figures(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from .experiments.figures import FIGURES
    from .plotting import PLOTTERS

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(list(FIGURES), desc="figures", unit="fig", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        data = FIGURES[name]()
        (out / f"{name}.json").write_text(json.dumps(_to_json(data), indent=1))
        fig = PLOTTERS[name](data)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
    print(f"wrote Figures 1-5 (PNG + JSON) to {out}/ in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="coupled-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("figures", help="write the paper's Figures 1-5 (PNG) and their curves (JSON)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.set_defaults(func=cmd_figures)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
