"""One coupled DDIM step of a DiT replica pair (issue 18): ours against diffusers + PyTorch, side by side.

Workload: a DiT-S/2-sized model (12 blocks, 6 heads x 64, patch 2, 1000 classes, learn_sigma) on
32 x 32 x 4 latents, a batch of 8 replica pairs, replica attention (eq 19, blockwise softmax) with
g = 0.5 in every block, then one deterministic DDIM step of both replicas (a mid-trajectory step of a
50-step schedule).

- ours: `cd.coupled_dit` (the replicas' tokens side by side, `replica_attention` in every block) and
  `cd.ddim_step`, one `jax.jit` of the split model.
- baseline: diffusers' `DiTTransformer2DModel` with the same weights (loaded into ours with
  `dit_from_diffusers`, and the two outputs checked to agree before timing) and an attention
  processor that computes the replica mixture with `torch.nn.functional.scaled_dot_product_attention`
  (an intra- and an inter-replica call per block), then diffusers' `DDIMScheduler.step`.

Both run on the batch of 16 images (2 replicas x 8 pairs); the median of 3 rounds x `--repeats`
timed calls each (alternating blocks, `models.median_times`); the ratio is baseline time / ours.

On an accelerator, `--size XL/2` runs the same step with DiT-XL/2's shape (28 blocks, 16 heads x 72,
random weights) and `--bf16` computes in bfloat16 with float32 parameters on both sides (ours
`dtype=jnp.bfloat16`, PyTorch `torch.autocast`); float32 runs allow TF32 on both sides there.

On a CPU the process gets `cd.tune_cpu(xla_flags=False)`: the allocator settings, and XLA's own
routing of dots (`--ynn-flag` restores the YNN flag of plain `cd.tune_cpu()`, for comparison).
With `--bf16` on a CPU with AMX (Sapphire Rapids and later) both sides' products run on the AMX
tiles: PyTorch's through oneDNN, ours through XLA:CPU's YNNPACK dots (bfloat16 operands, float32
accumulation).

    python benchmarks/dit_replica.py [--repeats 5] [--pairs 8] [--g 0.5] [--size S/2|XL/2] [--bf16] [--ynn-flag]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import coupled_diffusion as cd  # noqa: E402

# The CPU tuning's allocator settings, without its YNN flag unless --ynn-flag: on this inference
# step the flag costs ~15% in float32 and 2.4x in bfloat16 (benchmarks/README.md).
cd.tune_cpu(xla_flags="--ynn-flag" in sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _torch_baseline import DEVICE, sync  # noqa: E402
from flax import nnx  # noqa: E402
from models import median_times  # noqa: E402  (its tune_cpu() call finds the tuning above done)

from coupled_diffusion._torch_peers import tie_dit_embedders  # noqa: E402
from coupled_diffusion.models.pretrained import dit_from_diffusers  # noqa: E402

SIZES = {"S/2": (12, 6, 64), "B/2": (12, 12, 64), "L/2": (24, 16, 64), "XL/2": (28, 16, 72)}  # depth, heads, head width


class ReplicaAttnProcessor:
    """diffusers attention processor: the batch is [replica 1 | replica 2]; eq (19) with SDPA per block."""

    def __init__(self, g: float):
        self.g = g

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = (proj(hidden_states).view(b, n, heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        h = b // 2
        k_swap, v_swap = torch.cat([k[h:], k[:h]]), torch.cat([v[h:], v[:h]])
        out = (1 - self.g / 2) * F.scaled_dot_product_attention(q, k, v) + (self.g / 2) * F.scaled_dot_product_attention(q, k_swap, v_swap)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--g", type=float, default=0.5)
    parser.add_argument("--size", choices=sorted(SIZES), default="S/2")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters, on both sides")
    parser.add_argument("--ynn-flag", action="store_true", help="keep tune_cpu()'s YNN flag (XLA:CPU; slower here)")
    args = parser.parse_args()
    import diffusers

    torch.manual_seed(0)
    depth, heads, head_dim = SIZES[args.size]
    peer = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                                           num_layers=depth, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in peer.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    tie_dit_embedders(peer)
    peer.eval()
    tensors = {k: v.detach().numpy() for k, v in peer.state_dict().items()}
    ours = dit_from_diffusers(dict(peer.config), tensors, **({"dtype": jnp.bfloat16} if args.bf16 else {}))
    for block in peer.transformer_blocks:
        block.attn1.set_processor(ReplicaAttnProcessor(args.g))
    peer = peer.to(DEVICE)

    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=0)
    sched.set_timesteps(50)
    t_now = int(sched.timesteps[25])
    t_prev = t_now - 1000 // 50
    schedule = cd.VPSchedule.linear(1000)

    b = args.pairs
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, b, 32, 32, 4)).astype(np.float32)
    y = rng.integers(0, 1000, b)

    graphdef, state = nnx.split(ours)

    @jax.jit
    def ours_step(state, z, y):
        eps = cd.coupled_dit(nnx.merge(graphdef, state), z, jnp.full((b,), t_now), y, g=args.g)[..., :4]
        flat = lambda a: a.reshape((2 * b,) + a.shape[2:])  # noqa: E731
        out = cd.ddim_step(schedule, flat(z), flat(eps), jnp.full((2 * b,), t_now), jnp.full((2 * b,), t_prev))
        return out.reshape(z.shape)

    zj, yj = jnp.asarray(z), jnp.asarray(y)
    zt = torch.from_numpy(z.reshape(2 * b, 32, 32, 4).transpose(0, 3, 1, 2).copy()).to(DEVICE)
    yt = torch.from_numpy(np.concatenate([y, y])).to(DEVICE)
    tt = torch.full((2 * b,), t_now, device=DEVICE)

    def peer_step():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=args.bf16):
            eps = peer(zt, timestep=tt, class_labels=yt).sample[:, :4].float()
        out = sched.step(eps, t_now, zt).prev_sample
        sync()
        return out

    got = np.asarray(ours_step(state, zj, yj)).reshape(2 * b, 32, 32, 4)
    want = peer_step().cpu().numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(got - want).max())
    # float32 on the CPU agrees to rounding; TF32 (GPU float32) and bfloat16 round their products coarser
    tol = 5e-2 if args.bf16 else (1e-2 if DEVICE == "cuda" else 1e-3)
    assert err < tol * float(np.abs(want).max()), f"the two steps disagree: max |diff| {err}"
    times = median_times({"ours": lambda: ours_step(state, zj, yj).block_until_ready(), "diffusers": peer_step}, args.repeats)
    dtype = "bfloat16" if args.bf16 else "float32"
    print(f"CPU tuning: {cd.cpu_tuning()}")
    print(f"device: {jax.devices()[0].device_kind} / torch {DEVICE}; DiT-{args.size} 32x32x4, {dtype}, {b} replica pairs, g = {args.g}, "
          f"one coupled DDIM step (t = {t_now} -> {t_prev}); outputs agree to {err:.2e}")
    for name, t in times.items():
        print(f"  {name:10s} {t * 1e3:8.1f} ms   {2 * b / t:8.1f} img/s")
    print(f"ratio diffusers / ours: {times['diffusers'] / times['ours']:.2f}x")


if __name__ == "__main__":
    main()
