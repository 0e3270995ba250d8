"""Protocol II's cloning evaluation at one g: `cd.protocol2` against the same computation as a PyTorch + diffusers loop.

Workload (issue 17): the default run's U-Net (16, 32, 32; attention at 7 x 7), T = 200 linear VP
schedule, mode-shaped noise with g = 0.3, DDPM with `--num-steps` steps in the rescaled
coordinates of eq (102), batch `--n`, `--scan` scan times; per repeat: one master trajectory with
its states cached at the scan times, two clones from each cached state to t = 0, two batches of
independent samples, and both mode classifiers (C_u, and C_v with sign-symmetrised logits) on
every final sample; agreement counts.

- ours: `cd.protocol2(...)` (jitted sampler with `start_t` traced: one compile for every clone).
- baseline: diffusers' `UNet2DModel` with the same weights (the two clones of a scan time run as
  one batch of 2n, as ours do, and so do the independent samples) (they load into ours, and the two
  forwards are checked to agree before timing), diffusers' `DDPMScheduler.step` on the whitened
  state and eps (eq 102: whiten, step with unit noise, colour back), the same classifier weights in
  `torch.nn` (checked to give the same labels), a Python loop over steps as a PyTorch user
  writes it. 2 threads on the CPU.

The same work on both sides; the random draws differ (each library's own generator). Times are
medians over `--repeats` after a warm-up (which pays our compilation).

    python benchmarks/mnist_sync.py [--n 64] [--num-steps 50] [--scan 8] [--repeats 3]
"""

import argparse
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _torch_baseline import DEVICE, sync

import coupled_diffusion as cd
from coupled_diffusion.experiments.mnist_sync import ModeClassifier, mode_images, protocol2
from coupled_diffusion.models.pretrained import load_unet_diffusers

cd.tune_cpu()  # opt in to the CPU tuning, before JAX starts


def peer_unet(path):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=28, in_channels=2, out_channels=2, block_out_channels=(16, 32, 32),
                                  layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                  attention_head_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5).add_(torch.randn_like(p) * 0.02)
    model.eval()
    model.save_pretrained(path)
    return model.to(DEVICE)


class TorchClassifier(torch.nn.Module):
    """`ModeClassifier` in torch, with its weights: Flax's SAME padding at stride 2 pads (0, 1)."""

    def __init__(self, flax_model: ModeClassifier):
        super().__init__()
        t = lambda a: torch.tensor(np.asarray(a.get_value() if hasattr(a, "get_value") else a))  # noqa: E731
        self.w1, self.b1 = t(flax_model.c1.kernel).permute(3, 2, 0, 1).contiguous(), t(flax_model.c1.bias)
        self.w2, self.b2 = t(flax_model.c2.kernel).permute(3, 2, 0, 1).contiguous(), t(flax_model.c2.bias)
        self.l1w, self.l1b = t(flax_model.l1.kernel), t(flax_model.l1.bias)
        self.ow, self.ob = t(flax_model.out.kernel), t(flax_model.out.bias)
        self.symmetric = flax_model.symmetric

    def _logits(self, x):  # x: (B, 28, 28)
        f = torch.nn.functional
        h = f.relu(f.conv2d(f.pad(x[:, None], (0, 1, 0, 1)), self.w1, self.b1, stride=2))
        h = f.relu(f.conv2d(f.pad(h, (0, 1, 0, 1)), self.w2, self.b2, stride=2))
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # Flax flattens channels last
        return f.relu(h @ self.l1w + self.l1b) @ self.ow + self.ob

    def forward(self, x):
        return (self._logits(x) + self._logits(-x)) / 2 if self.symmetric else self._logits(x)


def torch_protocol2(unet, sched_cls, classifiers, g, scan, n, num_steps, gen):
    """The same cloning evaluation as `cd.protocol2`, written as a PyTorch user would."""
    r = 2**-0.5
    basis = torch.tensor([[r, r], [r, -r]], device=DEVICE)  # columns: u, v (eq 91)
    scale = torch.tensor([(1 - g) ** 0.5, (1 + g) ** 0.5], device=DEVICE)
    whiten = lambda z: torch.einsum("bchw,cm->bmhw", z, basis) / scale[None, :, None, None]  # noqa: E731
    color = lambda y: torch.einsum("bmhw,cm->bchw", y * scale[None, :, None, None], basis)  # noqa: E731
    sched = sched_cls(num_train_timesteps=200, beta_schedule="linear", beta_start=1e-4 * 5, beta_end=0.02 * 5,
                      variance_type="fixed_small", clip_sample=False)
    sched.set_timesteps(num_steps)
    ts = [int(t) for t in sched.timesteps]

    def run(z, start=0):
        for t in ts[start:]:
            with torch.no_grad():
                eps = unet(z, torch.full((z.shape[0],), t, device=DEVICE)).sample
            y = sched.step(whiten(eps), t, whiten(z), generator=gen).prev_sample
            z = color(y)
        return z

    def labels(z):
        x = (z + 1) / 2
        u, v = (x[:, 0] + x[:, 1]) / 2, (x[:, 0] - x[:, 1]) * r
        with torch.no_grad():
            return classifiers[0](u).argmax(-1), classifiers[1](v).argmax(-1)

    z = color(torch.randn(n, 2, 28, 28, generator=gen, device=DEVICE))
    cached = {}
    for i, t in enumerate(ts):  # the master trajectory, states cached at the scan times
        if t in scan:
            cached[t] = z
        with torch.no_grad():
            eps = unet(z, torch.full((n,), t, device=DEVICE)).sample
        z = color(sched.step(whiten(eps), t, whiten(z), generator=gen).prev_sample)
    agree = []
    for t in scan:  # both clones in one batch, as ours
        y = labels(run(torch.cat([cached[t], cached[t]]), ts.index(t)))
        agree.append([int((y[m][:n] == y[m][n:]).sum()) for m in range(2)])
    y = labels(run(color(torch.randn(2 * n, 2, 28, 28, generator=gen, device=DEVICE))))
    return agree, [int((y[m][:n] == y[m][n:]).sum()) for m in range(2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--num-steps", type=int, default=50)
    ap.add_argument("--scan", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from diffusers import DDPMScheduler

    g = 0.3
    schedule, noise = cd.VPSchedule.linear(200), cd.ModeNoise.paired(g)
    with tempfile.TemporaryDirectory() as tmp:
        peer = peer_unet(tmp)
        ours = load_unet_diffusers(tmp)
    eps_fn = cd.NNXEps(ours)
    ts = cd.diffusion.samplers.timesteps(200, args.num_steps)
    scan = sorted({int(ts[i]) for i in np.linspace(1, len(ts) - 1, args.scan).round().astype(int)})
    from flax import nnx

    clf = {"c_u": ModeClassifier(2, rngs=nnx.Rngs(1)), "c_v": ModeClassifier(2, symmetric=True, rngs=nnx.Rngs(2))}
    tclf = [TorchClassifier(clf["c_u"]).to(DEVICE), TorchClassifier(clf["c_v"]).to(DEVICE)]

    # the same work: the two networks and the two classifiers agree on the same inputs
    z = np.asarray(noise.sample(jax.random.key(0), (4, 28, 28, 2)))
    t = np.array([0, 50, 120, 199])
    mine = np.asarray(eps_fn(jnp.asarray(z), jnp.asarray(t)))
    with torch.no_grad():
        theirs = peer(torch.tensor(z).permute(0, 3, 1, 2).to(DEVICE), torch.tensor(t).to(DEVICE)).sample.permute(0, 2, 3, 1)
    err = float(np.max(np.abs(mine - theirs.cpu().numpy())))
    u, v = (np.asarray(a) for a in mode_images(jnp.asarray(z)))
    same = all(np.array_equal(np.asarray(jnp.argmax(clf[k](jnp.asarray(x)), -1)), tc(torch.tensor(x)).argmax(-1).numpy())
               for k, x, tc in (("c_u", u, tclf[0]), ("c_v", v, tclf[1])))
    print(f"U-Net forwards agree to {err:.1e}; classifier labels identical: {same}")
    if err > 1e-3 or not same:
        sys.exit("the two sides do not compute the same thing")

    def run_ours(seed):
        out = protocol2(eps_fn, schedule, noise, clf, scan_t=scan, n=args.n, num_steps=args.num_steps, seed=seed,
                        clip=None)  # as the baseline: diffusers clips in the whitened coordinates, not the same bound
        return out["phi_u"]["value"]

    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def run_theirs():
        out = torch_protocol2(peer, DDPMScheduler, tclf, g, set(scan), args.n, args.num_steps, gen)
        sync()
        return out

    run_ours(0), run_theirs()  # warm-up: our compilation, torch's allocator
    times = {"ours": [], "torch": []}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        run_ours(r + 1)
        times["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_theirs()
        times["torch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    order = list(ts)
    calls = 3 * len(ts) + sum(2 * (len(ts) - order.index(t)) for t in scan)  # master, 2 independent, 2 clones per scan time
    print(f"work per run: n = {args.n}, {len(scan)} scan times, {len(ts)} DDPM steps: {calls} network evaluations of {args.n} "
          f"images (master {args.n} per call; clone pairs and independent samples {2 * args.n} per call)")
    for k, v in med.items():
        print(f"{k:6s} {v:7.2f} s (median of {args.repeats}; {times[k]})")
    print(f"ours / torch speed: {med['torch'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
