"""Score-network throughput: the Flax NNX U-Net and DiT against diffusers' PyTorch models, side by side.

Workloads (issue 5):
- (a) the U-Net at the paper's MNIST size: 2 x 28 x 28, batch 128, widths (32, 64, 64), one residual
  block per level, attention at 7 x 7 and in the middle block. The peer is diffusers'
  `UNet2DModel` with the same configuration; it is the *same network* (the test suite loads its
  weights into ours and matches its forward to 1e-4), so parameter counts are identical.
- (b) DiT-S/2 on 32 x 32 x 4 latents, batch 32, 1000 classes, learn_sigma. The peer is diffusers'
  `DiTTransformer2DModel` with 6 heads x 64, 12 layers, patch 2 (it keeps a copy of the timestep
  and label embedders in every block, hence its larger parameter count; the compute is the same).

For each: a training step (forward, eps-MSE loss, backward, AdamW update; images/s) and an
inference forward (images/s): the median of 3 rounds x `--repeats` runs, timed in alternating blocks
(see `median_times`). The
forward FLOPs per image come from XLA's cost analysis (ours) and `torch.utils.flop_counter`
(peer); a training step is counted as 3x the forward. The fraction of this machine's matmul
peak uses a float32 4096^3 `jnp.matmul` measured in the same process. PyTorch runs with 2
threads; the U-Net peer is timed in its faster memory format (channels_last or contiguous).

    python benchmarks/models.py [--repeats 3] [--only unet|dit] [--no-tuning] [--no-onednn] [--bf16] [--batch-mult N]

On a GPU both frameworks run there (PyTorch on `cuda`, JAX on its default device), each call
is synchronised before the clock stops, and TF32 is allowed on both sides for float32 matmuls
and convolutions (JAX's default precision; `torch.backends.*.allow_tf32 = True`), so the
float32 rows compare like with like. `--bf16` times bfloat16 compute with float32 parameters
on both sides (ours: `dtype=jnp.bfloat16`; PyTorch: `torch.autocast`). `--batch-mult` scales
both batches (the issue's sizes are small for a GPU).

The benchmark opts in to the library's CPU tuning (`cd.tune_cpu()`, reported by `cd.cpu_tuning()`: glibc allocator settings
and an XLA:CPU flag; the allocator settings hold for the PyTorch side too, since both run in one
process). `--no-tuning` sets `COUPLED_DIFFUSION_CPU_TUNING=0` first, for the before/after comparison.
On a CPU the U-Net's convolutions run through oneDNN when the `onednn` extra is installed
(`coupled_diffusion.models.onednn`; the same library PyTorch's CPU convolutions use);
`--no-onednn` turns that off (`COUPLED_DIFFUSION_ONEDNN=0`) to time XLA's own convolutions.
Its FFI custom calls are invisible to XLA's cost analysis, so our FLOPs are counted on the
`lax` form of the same forward.
"""

import os
import sys

if "--no-tuning" in sys.argv:  # must happen before coupled_diffusion is imported
    os.environ["COUPLED_DIFFUSION_CPU_TUNING"] = "0"
if "--no-onednn" in sys.argv:
    os.environ["COUPLED_DIFFUSION_ONEDNN"] = "0"

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from _torch_baseline import (
    DEVICE,  # noqa: E402
    sync as _sync,  # noqa: E402
)
from flax import nnx  # noqa: E402

import coupled_diffusion as cd  # noqa: E402
from coupled_diffusion.models import onednn  # noqa: E402

cd.tune_cpu()  # opt in to the CPU tuning (the library's import changes nothing), before JAX starts


def median_times(fns: dict, repeats: int, rounds: int = 3, warmup: int = 3) -> dict:
    """Median wall time of each callable over `rounds` rounds of blocks.

    Each block is one untimed call then `repeats` timed calls of one contender, and the rounds
    alternate the contenders. Blocks, because XLA's and PyTorch's CPU thread pools keep
    spinning for a while after a call returns, so alternating single calls makes each slow the
    other (measured: the PyTorch U-Net step at 21 img/s interleaved call by call with JAX,
    97 img/s on its own); rounds, because this machine's speed drifts by tens of percent over
    minutes and both contenders should see the same drift. Each contender is first called
    `warmup` times: with the CPU tuning's allocator settings (no trimming, no mmap) XLA:CPU's
    heap grows in the first few steps until its step-sized temporaries stop fragmenting it (the
    DiT-S/2 step: three of its first seven calls faulted 4.4 GB of fresh pages, the rest none).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()  # compile / warm up
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def matmul_peak(dtype=jnp.float32) -> float:
    n = 8192 if jax.default_backend() == "gpu" else 4096
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = min(_time(lambda: f(a).block_until_ready()) for _ in range(3))
    return 2 * n**3 / t


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def jax_contender(model, batch, *, labels: bool):
    """Jitted train step (AdamW) and forward for an NNX model; returns callables and forward FLOPs per image.

    The steps are plain `jax.jit` functions of the split state (`nnx.split` once, `nnx.merge`
    inside the trace), so a call costs no Python traversal of the module graph; with
    `nnx.jit` that traversal is a fixed cost per call which shows on a GPU at small batches.
    """
    x, t, y, eps = batch
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    call = (lambda m, x, t, y: m(x, t, y)) if labels else (lambda m, x, t, y: m(x, t))
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(m, x, t, y, eps):
        out = call(m, x, t, y)
        return jnp.mean((out[..., : eps.shape[-1]].astype(jnp.float32) - eps) ** 2)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, t, y, eps):
        m, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, t, y, eps)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss

    @jax.jit
    def forward(state, x, t, y):
        m, _ = nnx.merge(graphdef, state)
        return call(m, x, t, y)

    # FLOPs from XLA:CPU's cost analysis of the forward, also on a GPU machine (there the compiled
    # module's analysis leaves out the convolutions and matmuls handed to cuDNN / cuBLAS).
    # The oneDNN convolutions are custom calls that the analysis does not see: count the lax form.
    cpu_args = jax.device_put((state, x, t, y), jax.devices("cpu")[0])
    with onednn.enabled(False):
        cost = jax.jit(lambda s, x, t, y: call(nnx.merge(graphdef, s)[0], x, t, y)).lower(*cpu_args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) / x.shape[0]
    box = [state]

    def train():
        box[0], loss = train_step(box[0], x, t, y, eps)
        loss.block_until_ready()

    return train, lambda: forward(box[0], x, t, y).block_until_ready(), flops


def torch_contender(model, batch, *, labels: bool, channels_last: bool = False, bf16: bool = False):
    batch = tuple(None if v is None else v.to(DEVICE) for v in batch)
    model = model.to(DEVICE)
    x, t, y, eps = batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kw = dict(class_labels=y) if labels else {}

    def autocast():
        return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t, **kw).sample
        loss = torch.mean((out[:, : eps.shape[1]].float() - eps) ** 2)
        loss.backward()
        opt.step()
        _sync()

    def forward():
        model.eval()
        with torch.no_grad(), autocast():
            model(x, t, **kw)
        _sync()

    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, **kw)
    return train_step, forward, counter.get_total_flops() / x.shape[0]


def count(model) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def report(name, batch, times, flops, params, peak):
    ours_train, ours_fwd = batch / times["ours train"], batch / times["ours forward"]
    theirs_train, theirs_fwd = batch / times["torch train"], batch / times["torch forward"]
    print(f"\n== {name} ==")
    print(f"parameters: ours {params[0]:,}  diffusers {params[1]:,}")
    print(f"forward GFLOP/image: ours {flops[0] / 1e9:.3f}  diffusers {flops[1] / 1e9:.3f}")
    for label, a, b, mult in (("train step", ours_train, theirs_train, 3), ("inference", ours_fwd, theirs_fwd, 1)):
        fa, fb = a * mult * flops[0] / peak, b * mult * flops[1] / peak
        print(f"{label:11s}: ours {a:8.1f} img/s ({fa:5.1%} of peak)  diffusers {b:8.1f} img/s ({fb:5.1%} of peak)"
              f"  ratio {a / b:.2f}x")


def bench_unet(repeats, peak, *, bf16=False, batch_mult=1):
    import diffusers

    b, size, ch = 128 * batch_mult, 28, 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, size, size, ch), np.float32)
    eps = rng.standard_normal((b, size, size, ch), np.float32)
    t = rng.integers(0, 1000, b)
    config = dict(sample_size=size, in_channels=ch, out_channels=ch, block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    peer = diffusers.UNet2DModel(**config)
    ours = cd.UNet(in_channels=ch, block_channels=(32, 64, 64), layers_per_block=1, attention=(False, False, True),
                   num_groups=8, attention_head_dim=8, dtype=jnp.bfloat16 if bf16 else None, rngs=nnx.Rngs(0))
    params = (count(ours), sum(p.numel() for p in peer.parameters()))
    jb = (jnp.asarray(x), jnp.asarray(t), None, jnp.asarray(eps))
    tb = (torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(), torch.tensor(t), None,
          torch.tensor(eps.transpose(0, 3, 1, 2)).contiguous())
    o_train, o_fwd, o_flops = jax_contender(ours, jb, labels=False)
    best = None
    for cl in (False, True):
        p_train, p_fwd, p_flops = torch_contender(diffusers.UNet2DModel(**config), tb, labels=False, channels_last=cl, bf16=bf16)
        tt = median_times({"train": p_train}, 2, rounds=1)["train"]
        print(f"torch U-Net train step, channels_last={cl}: {b / tt:.1f} img/s")
        if best is None or tt < best[0]:
            best = (tt, p_train, p_fwd, p_flops)
    times = median_times({"ours train": o_train, "torch train": best[1], "ours forward": o_fwd, "torch forward": best[2]},
                         repeats)
    report(f"U-Net, 2 x 28 x 28, batch {b}", b, times, (o_flops, best[3]), params, peak)


def bench_dit(repeats, peak, *, bf16=False, batch_mult=1):
    import diffusers

    b, size, ch = 32 * batch_mult, 32, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, size, size, ch), np.float32)
    eps = rng.standard_normal((b, size, size, ch), np.float32)
    t, y = rng.integers(0, 1000, b), rng.integers(0, 1000, b)
    peer = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=ch, out_channels=2 * ch,
                                           num_layers=12, sample_size=size, patch_size=2, num_embeds_ada_norm=1000)
    ours = cd.DiT.from_config("DiT-S/2", input_size=size, in_channels=ch, num_classes=1000,
                              dtype=jnp.bfloat16 if bf16 else None, rngs=nnx.Rngs(0))
    params = (count(ours), sum(p.numel() for p in peer.parameters()))
    jb = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(eps))
    tb = (torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(), torch.tensor(t), torch.tensor(y),
          torch.tensor(eps.transpose(0, 3, 1, 2)).contiguous())
    o_train, o_fwd, o_flops = jax_contender(ours, jb, labels=True)
    p_train, p_fwd, p_flops = torch_contender(peer, tb, labels=True, bf16=bf16)
    times = median_times({"ours train": o_train, "torch train": p_train, "ours forward": o_fwd, "torch forward": p_fwd},
                         repeats)
    report(f"DiT-S/2, 32 x 32 x 4 latents, batch {b}", b, times, (o_flops, p_flops), params, peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["unet", "dit"])
    parser.add_argument("--no-tuning", action="store_true", help="skip coupled_diffusion's import-time CPU tuning")
    parser.add_argument("--no-onednn", action="store_true", help="XLA's own convolutions instead of oneDNN's on a CPU")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters, on both sides")
    parser.add_argument("--batch-mult", type=int, default=1, help="multiply both batch sizes (for GPUs)")
    args = parser.parse_args()
    peak_dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    peak = matmul_peak(peak_dtype)
    print(f"devices: {jax.devices()}  torch: {DEVICE}, {torch.get_num_threads()} threads  "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"CPU tuning: {cd.cpu_tuning()}")
    print(f"oneDNN convolutions: {onednn.status()}")
    print(f"{jnp.dtype(peak_dtype).name} matmul peak (square jnp.matmul): {peak / 1e9:.0f} GFLOP/s")
    kw = dict(bf16=args.bf16, batch_mult=args.batch_mult)
    if args.only in (None, "unet"):
        bench_unet(args.repeats, peak, **kw)
    if args.only in (None, "dit"):
        bench_dit(args.repeats, peak, **kw)


if __name__ == "__main__":
    main()
