"""End-to-end training throughput on the paper's MNIST setting: `cd.train` against a PyTorch loop of diffusers' UNet2DModel.

Workload (issue 6): two-channel MNIST pairs (x, T(x)) with the edge transform, MAIN pairing and the
random A/B swap, mode-shaped noise with g = 0.3, T = 200 linear-beta VP diffusion, the paper's
U-Net (widths 32, 64, 64; attention at 7 x 7), batch 128, AdamW with warm-up + cosine decay,
global-norm clipping and a parameter EMA.

- ours: `cd.train(config, data=PairedMNIST)` itself, timed end to end for `--steps` steps (the
  compiled step is cached, so a warm-up call of the same configuration pays the compilation; the
  data set is placed on the device once beforehand, as the baseline's tensors are built once):
  the epoch permutation on the host, the gather / swap / noise on the device inside the jitted
  step, the progress bookkeeping at every `log_every` steps.
- baseline: the same pipeline in PyTorch: the images and their transforms as tensors, an epoch
  permutation, a gather per step, the swap, mode-shaped noise through the (u, v) modes, then
  diffusers' `UNet2DModel` (the same network: its weights load into ours and match to 1e-4),
  `clip_grad_norm_`, `torch.optim.AdamW` with a `LambdaLR` warm-up + cosine, and a `_foreach`
  EMA. 2 threads on the CPU; the faster memory format is used.

Each contender runs `--rounds` timed blocks, alternating; the median images/s is reported.

The benchmark opts in to the library's CPU tuning (`cd.tune_cpu()`, reported by `cd.cpu_tuning()`, printed at the start; the
allocator part holds for both contenders, which share the process); `--no-tuning` skips it.
With the `onednn` extra installed, our U-Net's convolutions run through oneDNN
(`coupled_diffusion.models.onednn`, status printed at the start); `--no-onednn` keeps XLA's own.

    python benchmarks/training.py [--steps 40] [--rounds 3] [--n-train 50000] [--no-tuning] [--no-onednn]
"""

import argparse
import math
import os
import statistics
import sys
import time

if "--no-tuning" in sys.argv:  # must happen before coupled_diffusion is imported
    os.environ["COUPLED_DIFFUSION_CPU_TUNING"] = "0"
if "--no-onednn" in sys.argv:
    os.environ["COUPLED_DIFFUSION_ONEDNN"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _torch_baseline import DEVICE, sync  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import coupled_diffusion as cd  # noqa: E402
from coupled_diffusion.diffusion.train import TrainConfig, train  # noqa: E402
from coupled_diffusion.models import onednn  # noqa: E402
from coupled_diffusion.models.sharding import data_mesh  # noqa: E402

cd.tune_cpu()  # opt in to the CPU tuning (the library's import changes nothing), before JAX starts


def torch_loop(data: cd.PairedMNIST, config: TrainConfig, channels_last: bool):
    import diffusers

    dev = torch.device(DEVICE)
    X = torch.tensor(np.asarray(data.x), device=dev)
    TX = torch.tensor(np.asarray(data.tx), device=dev)
    n, B, T = len(data), config.batch_size, config.T
    betas = torch.linspace(1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.999), T, dtype=torch.float32)  # the scaled linear rule
    abar = torch.cumprod(1 - betas, 0).to(dev)
    model = diffusers.UNet2DModel(sample_size=28, in_channels=2, out_channels=2, block_out_channels=config.block_channels,
                                  layers_per_block=config.layers_per_block,
                                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                                  norm_num_groups=config.num_groups, attention_head_dim=config.attention_head_dim).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_lambda(step):
        if step < config.warmup_steps:
            return step / max(config.warmup_steps, 1)
        p = min(1.0, (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    g = config.g
    state = dict(step=0, perm=None)

    def run(steps: int):
        model.train()
        for _ in range(steps):
            s = state["step"]
            epoch, i = divmod(s, n // B)
            if i == 0 or state["perm"] is None:
                state["perm"] = torch.randperm(n, device=dev)
            idx = state["perm"][i * B: (i + 1) * B]
            z = torch.stack([X[idx], TX[idx]], 1)  # (B, 2, 28, 28)
            flip = torch.rand(B, 1, 1, 1, device=dev) < 0.5
            z = torch.where(flip, z.flip(1), z) * 2 - 1
            t = torch.randint(0, T, (B,), device=dev)
            e_u = torch.randn(B, 28, 28, device=dev) * math.sqrt(1 - g)
            e_v = torch.randn(B, 28, 28, device=dev) * math.sqrt(1 + g)
            eps = torch.stack([e_u + e_v, e_u - e_v], 1) / math.sqrt(2)
            a = abar[t].view(B, 1, 1, 1)
            zt = (a.sqrt() * z + (1 - a).sqrt() * eps).contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((model(zt, t).sample - eps) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_mul_(ema, config.ema_decay)
                torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - config.ema_decay)
            state["step"] = s + 1
        loss.detach().item()  # wait for the last step
        sync()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-tuning", action="store_true", help="skip coupled_diffusion's import-time CPU tuning")
    parser.add_argument("--no-onednn", action="store_true", help="XLA's own convolutions instead of oneDNN's")
    args = parser.parse_args()
    config = TrainConfig.paper(batch_size=args.batch_size, steps=10_000, log_every=25)
    x, y = cd.load_mnist("train")
    data = cd.PairedMNIST(x[: args.n_train], y[: args.n_train], transform="edge", pairing="main")
    B = config.batch_size
    print(f"devices: {jax.devices()}  torch: {DEVICE}, {torch.get_num_threads()} threads; {len(data)} pairs, batch {B}, "
          f"U-Net {config.block_channels}, T = {config.T}, g = {config.g}")
    print(f"CPU tuning: {cd.cpu_tuning()}")
    print(f"oneDNN convolutions: {onednn.status()}")

    # The data set goes to the device once, as the PyTorch loop's tensors do: `train` places it with
    # `jax.device_put`, a no-op for arrays already there, so the timed blocks do not re-upload
    # 50,000 pairs each (a fresh 300 MB block per call, which also fragmented the heap).
    placed = jax.device_put(data, NamedSharding(data_mesh(), PartitionSpec()))

    def ours():
        train(config, None, data=placed, progress=False, stop_at=args.steps)

    t0 = time.perf_counter()
    train(config, None, data=placed, progress=False, stop_at=2)  # compile
    print(f"ours: first call (model build + compilation) {time.perf_counter() - t0:.1f} s")
    best = None
    for cl in (False, True):
        fn = torch_loop(data, config, cl)
        fn(2)
        t0 = time.perf_counter()
        fn(5)
        rate = 5 * B / (time.perf_counter() - t0)
        print(f"torch loop, channels_last={cl}: {rate:.1f} img/s")
        if best is None or rate > best[0]:
            best = (rate, fn, cl)
    theirs = lambda: best[1](args.steps)
    times = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("torch", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: args.steps * B / statistics.median(v) for k, v in times.items()}
    print(f"\nend-to-end training, {args.steps} steps x {args.rounds} rounds (median):")
    print(f"  coupled_diffusion.train : {rate['ours']:8.1f} img/s")
    print(f"  PyTorch + diffusers loop: {rate['torch']:8.1f} img/s  (channels_last={best[2]})")
    print(f"  ratio {rate['ours'] / rate['torch']:.2f}x")


if __name__ == "__main__":
    main()
