"""What the parts of a `TrainConfig` build: the U-Net, the optimiser and its learning-rate schedule,
the forward noise process, and the paired data set."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..data.mnist import load_mnist
from ..data.pairing import PairedMNIST
from ..models.unet import UNet
from .config import DataConfig, ModelConfig, NoiseConfig, OptimizerConfig
from .noise import ModeNoise, VPSchedule


def build_model(model: ModelConfig, seed: int) -> UNet:
    """The two-channel eps-prediction U-Net, its parameters initialised from `seed`."""
    return UNet(in_channels=2, block_channels=model.block_channels, layers_per_block=model.layers_per_block,
                attention=model.attention, num_groups=model.num_groups, attention_head_dim=model.attention_head_dim,
                dropout=model.dropout, dtype=jnp.bfloat16 if model.bf16 else None, rngs=nnx.Rngs(seed))


def learning_rate(optimizer: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr / 100` at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, optimizer.lr, max(optimizer.warmup_steps, 1),
                                              max(steps, optimizer.warmup_steps + 1), end_value=optimizer.lr * 0.01)


def build_optimizer(optimizer: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the [`learning_rate`][] schedule of a `steps`-step run."""
    return optax.chain(optax.clip_by_global_norm(optimizer.grad_clip),
                       optax.adamw(learning_rate(optimizer, steps), weight_decay=optimizer.weight_decay))


def build_noise(noise: NoiseConfig) -> tuple[VPSchedule, ModeNoise]:
    """The VP schedule and the mode-shaped noise law (eq 92) of the forward process."""
    return VPSchedule.named(noise.schedule, noise.T), ModeNoise.paired(noise.g)


def build_data(data: DataConfig) -> PairedMNIST:
    """The paired MNIST training set: the first `n_train` images of the training split (with `balance`,
    then the first `m` of each kept class, `m` the rarest class's count), transformed and paired."""
    x, y = load_mnist("train", data.data_path)
    if data.n_train is not None:
        x, y = x[: data.n_train], y[: data.n_train]
    if data.balance:
        labels = np.asarray(y)
        kept = np.unique(labels) if data.classes is None else [c for c in sorted(set(data.classes)) if np.any(labels == c)]
        per_class = [np.flatnonzero(labels == c) for c in kept]
        if per_class:  # none kept: PairedMNIST names the missing classes
            m = min(map(len, per_class))
            idx = np.sort(np.concatenate([i[:m] for i in per_class]))
            x, y = x[idx], y[idx]
    return PairedMNIST(x, y, transform=data.transform, pairing=data.pairing, classes=data.classes)
