"""A 1024 x 1024 (g, theta) speciation-time sweep: `cd.sweep` on 1 and on 2 (fake CPU) devices.

Baseline, in the same process: one `jax.jit(jax.vmap(...))` call over the flattened grid on
a single device (no chunking, no sharding), the program a user would write by hand.
Each device count runs in its own process (the count is fixed when JAX starts); on a
GPU host the parent's own devices are used as well. Throughput is points/s, median of
repeats, after compilation.

    python benchmarks/sweep.py [--n 1024] [--repeats 3]
"""

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
import coupled_diffusion as cd

cd.tune_cpu()  # opt in to the CPU tuning (the library's import changes nothing), before JAX starts

n, repeats = int(sys.argv[1]), int(sys.argv[2])
f = lambda g, theta: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, theta),
                                        t_max=10.0, throw=False).value
g, th = jnp.linspace(0.0, 2.0, n), jnp.linspace(0.0, np.pi, n)
G, TH = (x.reshape(-1) for x in jnp.meshgrid(g, th, indexing="ij"))
plain = jax.jit(jax.vmap(f))

def timed(fn):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

t_plain = timed(lambda: plain(G, TH).block_until_ready())
t_sweep = timed(lambda: cd.sweep(f, g=g, theta=th, chunk_size=131072))
a = np.asarray(plain(G, TH)).reshape(n, n)
b = cd.sweep(f, g=g, theta=th, chunk_size=131072).values
same = bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, rtol=1e-12, equal_nan=True))
print(json.dumps(dict(devices=[str(d) for d in jax.devices()], plain=n * n / t_plain, sweep=n * n / t_sweep, same=same)))
"""


def run(n, repeats, n_devices=None):
    env = dict(os.environ)
    if n_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(repeats)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = [("1 CPU device", run(args.n, args.repeats, 1)), ("2 fake CPU devices", run(args.n, args.repeats, 2))]
    import jax

    if jax.default_backend() != "cpu":
        rows.append((f"{jax.default_backend()} host", run(args.n, args.repeats)))
    print(f"{args.n} x {args.n} = {args.n**2:,} speciation times (anisotropic M, float64, 64-step bracket + Newton)")
    base = rows[0][1]["sweep"]
    for name, r in rows:
        print(f"{name:>20}: cd.sweep {r['sweep']:>10,.0f} points/s   plain jit+vmap (1 device) {r['plain']:>10,.0f} points/s   "
              f"sweep/plain {r['sweep'] / r['plain']:.2f}   vs 1 device {r['sweep'] / base:.2f}x   identical={r['same']}")
    print(f"(median of {args.repeats} timed repeats per setting; total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
