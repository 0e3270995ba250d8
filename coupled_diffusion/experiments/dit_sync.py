r"""The DiT paper's two protocols (Section 3) on a replica pair of a class-conditional DiT.

The default backbone is a small pixel-space DiT trained here on MNIST ([`train_mnist_dit`][],
resumable) with a small digit classifier whose penultimate features stand in for the paper's
ResNet-50 (eq 70). [`run_dit_sync`][] trains or reuses both and runs:

- **Protocol I** ([`protocol1`][]): for each coupling g, the pair coupled for the first k reverse
  steps and independent after, DDIM with $\eta = 1$; the feature cosine of the two final images
  (eq 70) and their coarse / fine agreement (eq 71-72) against k over paired seeds; sigmoid
  midpoints of the median curves with 95% bootstrap intervals (Table 1, $t_{coarse}$, $t_{fine}$,
  eq 73). The uncoupled control (Figure 5) shares the noise draws until k instead.
- **Protocol II** ([`protocol2`][]): the pair coupled at constant g throughout, deterministic DDIM;
  each block's hidden-state difference projected on the fixed modes of the first step (dual Gram,
  eq 43) and the normalised energies of the leading and trailing bands at the Protocol I speciation
  step (eq 75-80), across depth (Figures 1, 9, 10).

Every all-pairs batch of one g is one compiled sampler call: the intervention step is a per-pair
array, so the k grid and the seeds share a batch (`sample_replicas`). All results are in units of
reverse steps k (0 = the first, noisiest step) with the matching timesteps alongside.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .._checkpoint import Checkpoints
from .._runlock import RunLock
from ..data.mnist import load_mnist
from ..diffusion.config import _need
from ..diffusion.noise import VPSchedule, add_noise
from ..diffusion.replica_sync import (
    block_modes,
    coarse_fine_similarity,
    dit_pair_eps,
    fit_sigmoid,
    hidden_differences,
    mode_energy_trajectory,
    sample_replicas,
)
from ..diffusion.samplers import timesteps
from ..models.dit import DiT
from ..models.replica import replica_init
from .sync_sweep import _write_json

__all__ = ["Backbone", "DiTSync", "DigitClassifier", "pretrained_backbone", "protocol1", "protocol2", "run_dit_sync",
           "train_digit_classifier", "train_mnist_dit"]


def _int_at_least(v, least: int) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= least


@dataclasses.dataclass(frozen=True)
class DiTSync:
    """Everything that defines a `dit-sync` run. The defaults fit 2 CPU cores in about 35 minutes.

    - The model: a class-conditional DiT on 28 x 28 MNIST in [-1, 1], patch `patch_size`, `depth`
      blocks of width `hidden_size` with `num_heads` heads, eps-prediction under the linear VP
      schedule of `T` steps; AdamW (warm-up, cosine decay), gradient clipping at 1, an EMA.
    - The feature encoder: a small CNN digit classifier trained for `classifier_steps`.
    - Protocol I: couplings `gs`, `num_steps` DDIM steps ($\\eta = 1$), intervention after every
      `intervention_every` steps (0 ... `num_steps`), `n_pairs` paired seeds of class `label`
      started by [`replica_init`][] with `init_eps`; coarse scale `coarse_size` (pooled pixels).
    - Protocol II: couplings `p2_gs`, deterministic DDIM with the same `num_steps` and seeds;
      bands of `n_band` modes. Bootstrap intervals from `n_boot` resamples of the seeds.
    - The sample-quality score: `quality_per_class` samples of each digit, classified.
    """

    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    patch_size: int = 4
    T: int = 1000
    train_steps: int = 3600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 250
    classifier_steps: int = 800
    gs: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    num_steps: int = 50
    intervention_every: int = 5
    n_pairs: int = 32
    init_eps: float = 0.1
    label: int = 0
    coarse_size: int = 7
    p2_gs: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
    n_band: int = 3
    n_boot: int = 1000
    quality_per_class: int = 10
    data_path: str | None = None

    def __post_init__(self):
        for name in ("gs", "p2_gs"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if isinstance(self.data_path, os.PathLike):
            object.__setattr__(self, "data_path", os.fspath(self.data_path))

    def validate(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "patch_size", "train_steps", "batch_size", "ckpt_every",
                     "classifier_steps", "num_steps", "intervention_every", "n_band", "quality_per_class"):
            _need(_int_at_least(getattr(self, name), 1), f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        _need(_int_at_least(self.T, 2), f"`T` must be an integer >= 2, got {self.T!r}.")
        _need(28 % self.patch_size == 0, f"`patch_size` must divide 28 (1, 2, 4, 7, 14, 28), got {self.patch_size}.")
        _need(self.hidden_size % self.num_heads == 0 and self.hidden_size % 4 == 0,
              f"`hidden_size` must be a multiple of 4 and of `num_heads`, got {self.hidden_size} and {self.num_heads}.")
        _need(self.num_steps <= self.T, f"`num_steps` must be at most `T` = {self.T}, got {self.num_steps}.")
        _need(len(self.intervention_points()) >= 5, f"Protocol I needs at least 5 intervention points for its sigmoid fits: "
              f"lower `intervention_every` ({self.intervention_every}) or raise `num_steps` ({self.num_steps}).")
        _need(_int_at_least(self.n_pairs, 2), f"`n_pairs` must be an integer >= 2, got {self.n_pairs!r}.")
        _need(2 * self.n_band <= self.n_pairs - 1, f"`n_band` must satisfy 2 n_band <= n_pairs - 1 (the modes the seeds "
              f"span, less one), got n_band {self.n_band} with {self.n_pairs} pairs.")
        _need(_int_at_least(self.warmup_steps, 0) and _int_at_least(self.seed, 0) and _int_at_least(self.n_boot, 0),
              "`warmup_steps`, `seed` and `n_boot` must be integers >= 0.")
        for name, lo, hi in (("lr", 0, None), ("ema_decay", 0, 1), ("class_dropout", 0, 1), ("init_eps", 0, 1)):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and math.isfinite(v) and v >= lo and (hi is None or v < hi or name == "init_eps" and v <= 1)
            _need(ok and (name != "lr" or v > 0), f"`{name}` must be a finite number in [{lo}, {hi if hi else 'inf'}), got {v!r}.")
        for name in ("gs", "p2_gs"):
            v = getattr(self, name)
            _need(isinstance(v, tuple) and len(v) > 0 and all(isinstance(g, int | float) and 0 <= g <= 1 for g in v),
                  f"`{name}` must be a non-empty list of couplings in [0, 1], got {v!r}.")
        _need(_int_at_least(self.label, 0), f"`label` must be a class index >= 0 (a digit 0-9 for the MNIST DiT), got {self.label!r}.")
        _need(_int_at_least(self.coarse_size, 1) and self.coarse_size <= 28, f"`coarse_size` must be in [1, 28], got {self.coarse_size!r}.")

    def intervention_points(self) -> list[int]:
        """The Protocol I grid of coupled-step counts k, 0 ... `num_steps`."""
        return sorted(set(range(0, self.num_steps + 1, self.intervention_every)) | {self.num_steps})

    def model_fields(self) -> dict:
        """The fields that define the trained model (a run directory's model is reused only if they match)."""
        names = ("hidden_size", "depth", "num_heads", "patch_size", "T", "train_steps", "batch_size", "lr", "warmup_steps",
                 "ema_decay", "class_dropout", "seed", "data_path")
        return {n: getattr(self, n) for n in names}

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> DiTSync:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def quick(cls, **overrides) -> DiTSync:
        """A smoke-test scale (minutes): a tiny model, few seeds; numbers without meaning."""
        kw = dict(hidden_size=32, depth=2, num_heads=2, train_steps=30, batch_size=16, ckpt_every=10, classifier_steps=30,
                  num_steps=10, intervention_every=2, n_pairs=8, n_band=2, n_boot=50, gs=(0.5, 1.0), p2_gs=(0.0, 1.0), T=100)
        return cls(**(kw | overrides))


# ------------------------------------------------------------------------------------------------ the model


def build_mnist_dit(cfg: DiTSync, seed: int | None = None) -> DiT:
    """The class-conditional pixel-space MNIST DiT of `cfg` (10 classes, one channel, eps only)."""
    return DiT(input_size=28, patch_size=cfg.patch_size, in_channels=1, hidden_size=cfg.hidden_size, depth=cfg.depth,
               num_heads=cfg.num_heads, num_classes=10, learn_sigma=False, class_dropout_prob=cfg.class_dropout,
               rngs=nnx.Rngs(cfg.seed if seed is None else seed))


def _images(cfg: DiTSync, split: str):
    x, y = load_mnist(split, cfg.data_path)
    return jnp.asarray(x[..., None] * 2 - 1, jnp.float32), jnp.asarray(y, jnp.int32)


@functools.lru_cache(maxsize=4)
def _train_step(graphdef, cfg: DiTSync):
    """`(tx, step)`: the optimizer and the jitted training step of `cfg`, built once per configuration
    (a resumed run in the same process reuses the compiled step)."""
    schedule = VPSchedule.linear(cfg.T)
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.train_steps, cfg.warmup_steps + 1), cfg.lr / 100)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-4))

    @jax.jit
    def step(params, opt, ema, i, images, labels):
        key = jax.random.fold_in(jax.random.key(cfg.seed), i)
        k_idx, k_t, k_eps, k_drop = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
        x0, y = images[idx], labels[idx]
        t = jax.random.randint(k_t, (cfg.batch_size,), 0, cfg.T)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)

        def loss_fn(p):
            pred = nnx.merge(graphdef, p)(add_noise(schedule, x0, eps, t), t, y, train=True, key=k_drop)
            return jnp.mean(jnp.square(pred - eps))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, new_opt = tx.update(grads, opt, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + i) / (10.0 + i))
        new_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new_params)
        return new_params, new_opt, new_ema, loss, ok

    return tx, step


def train_mnist_dit(cfg: DiTSync, out: Path, *, progress: bool = True, stop_at: int | None = None) -> tuple[DiT, list[dict]]:
    """Train (or resume, or reuse) the MNIST DiT of `cfg` in `out/model`: orbax checkpoints every
    `ckpt_every` steps (atomic, verified on restore); everything random is a function of
    `(seed, step)`, so a resumed run continues exactly. `stop_at`: stop after that step (with a
    checkpoint), as a killed run would. **Returns:** the EMA model and the loss log."""
    out = Path(out) / "model"
    model = build_mnist_dit(cfg)
    graphdef, params = nnx.split(model)
    tx, step = _train_step(graphdef, cfg)
    tree = {"params": params, "opt": tx.init(params), "ema": params}
    fields = json.loads(json.dumps(cfg.model_fields()))
    history: list[dict] = []
    start = 0
    with Checkpoints(out / "checkpoints", keep=2) as ckpts:
        def same_model(doc):
            if doc.get("model") != fields:
                diff = sorted(k for k in fields if doc.get("model", {}).get(k) != fields[k])
                raise ValueError(f"{out} holds a model trained with other settings (fields {diff}); use another --out.")

        found = ckpts.restore_newest(tree, check_doc=same_model, set_aside=True)
        if found is not None:
            start, tree, doc = found
            history = doc.get("history", [])
        end = cfg.train_steps if stop_at is None else min(int(stop_at), cfg.train_steps)
        if start < end:
            images, labels = _images(cfg, "train")
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.train_steps, initial=start, desc="dit-sync: train DiT", unit="step")
            p, o, e = tree["params"], tree["opt"], tree["ema"]
            losses, t0 = [], time.perf_counter()
            try:
                for i in range(start, end):
                    p, o, e, loss, ok = step(p, o, e, jnp.int32(i), images, labels)
                    losses.append(loss)
                    done = i + 1
                    if done % 25 == 0 or done == end or done % cfg.ckpt_every == 0:
                        vals = np.asarray(jax.device_get(losses), np.float64)
                        if not np.all(np.isfinite(vals)):
                            raise FloatingPointError(f"non-finite loss by step {done}; the parameters were kept from before it. "
                                                     f"Lower `lr` ({cfg.lr}) or raise `warmup_steps`.")
                        history.append({"step": done, "loss": float(vals.mean()),
                                        "img_per_s": len(vals) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)})
                        losses, t0 = [], time.perf_counter()
                        if bar is not None:
                            bar.update(done - bar.n)
                            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                    if done % cfg.ckpt_every == 0 or done == end:
                        ckpts.save(done, {"params": p, "opt": o, "ema": e}, {"model": fields, "history": history})
            finally:
                if bar is not None:
                    bar.close()
            tree = {"params": p, "opt": o, "ema": e}
    return nnx.merge(graphdef, tree["ema"]), history


# ------------------------------------------------------------------------------------------------ the feature encoder


class DigitClassifier(nnx.Module):
    """A small CNN on (B, 28, 28, 1) images in [-1, 1]: `features(x)` (B, 64), the penultimate layer
    (Protocol I's feature space, eq 70), and `__call__(x)`, the 10 logits."""

    def __init__(self, *, width: int = 16, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.l1 = nnx.Linear(7 * 7 * 2 * width, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def features(self, x):
        h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x))))
        return jax.nn.relu(self.l1(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.out(self.features(x))


def train_digit_classifier(cfg: DiTSync, out: Path, *, progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train (or reuse) the feature classifier in `out/classifier` with Adam on the training split.
    **Returns:** the model and its accuracy on the test split."""
    model = DigitClassifier(rngs=nnx.Rngs(cfg.seed + 1))
    graphdef, params = nnx.split(model)
    steps = cfg.classifier_steps
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    fields = {"classifier_steps": steps, "seed": cfg.seed, "data_path": cfg.data_path}
    with Checkpoints(Path(out) / "classifier", keep=1) as ckpts:
        found = ckpts.restore_newest(params, check_doc=lambda d: _need(d.get("fields") == fields, f"{out}/classifier was trained "
                                                                       f"with other settings; use another --out."))
        if found is not None:
            _, params, doc = found
            return nnx.merge(graphdef, params), float(doc["test_accuracy"])
        images, labels = _images(cfg, "train")

        def step(i, carry):
            p, o = carry
            key = jax.random.fold_in(jax.random.key(cfg.seed + 7), i)
            idx = jax.random.randint(key, (128,), 0, images.shape[0])
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                nnx.merge(graphdef, p)(images[idx]), labels[idx]).mean())(p)
            u, o = tx.update(grads, o, p)
            return optax.apply_updates(p, u), o

        if progress:
            print(f"dit-sync: training the feature classifier ({steps} steps)", flush=True)
        params, _ = jax.jit(lambda p, o: jax.lax.fori_loop(0, steps, step, (p, o)))(params, tx.init(params))
        xt, yt = _images(cfg, "test")
        pred = jnp.argmax(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, xt), -1)
        acc = float(jnp.mean(pred == yt))
        ckpts.save(steps, params, {"fields": fields, "test_accuracy": acc})
    return nnx.merge(graphdef, params), acc


def sample_quality(model, classifier, cfg: DiTSync, *, per_class: int = 10, key=None) -> dict:
    """How well the MNIST DiT draws what it is asked for: `per_class` samples of each digit (DDIM,
    `eta = 1`, `cfg.num_steps` steps, uncoupled), scored by the digit classifier. **Returns:**
    `match` (the fraction classified as the conditioning digit), `confident_match` (also with
    probability >= 0.9) and `per_class` (the match fraction per digit)."""
    key = jax.random.key(cfg.seed + 2000) if key is None else key
    y = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)
    z = jax.random.normal(jax.random.fold_in(key, 0), (y.shape[0], 28, 28, 1), jnp.float32)
    out = sample_replicas(dit_pair_eps(model, y), VPSchedule.linear(cfg.T), jax.random.fold_in(key, 1), jnp.stack([z, z]), g=0.0,
                          num_steps=cfg.num_steps, eta=1.0, clip=1.0)[0]
    prob = np.asarray(jax.nn.softmax(jax.jit(lambda x, m=nnx.split(classifier): nnx.merge(*m)(x))(out), -1))
    yn = np.asarray(y)
    hit = prob.argmax(-1) == yn
    return {"match": float(hit.mean()), "confident_match": float((hit & (prob.max(-1) >= 0.9)).mean()),
            "per_class": [float(hit[yn == c].mean()) for c in range(10)], "samples": np.asarray(out[::per_class, ..., 0])}


def _feature_cosine(encoder, x1, x2):
    f1, f2 = encoder(x1), encoder(x2)
    return jnp.sum(f1 * f2, -1) / jnp.sqrt(jnp.sum(f1 * f1, -1) * jnp.sum(f2 * f2, -1) + 1e-30)


# ------------------------------------------------------------------------------------------------ backbones


@dataclasses.dataclass
class Backbone:
    """What the protocols run on: a DiT with its `schedule`, the state `shape` (H, W, C) it samples,
    `decode(states) -> images` (None: the states are the images), `encoder(images) -> features`
    (eq 70), the DDIM `clip` of x0-hat (None: unbounded) and a `description` (recorded with the run)."""

    model: DiT
    schedule: VPSchedule
    shape: tuple[int, int, int]
    encoder: object
    decode: object = None
    clip: float | None = 1.0
    description: dict = dataclasses.field(default_factory=dict)


def _chunked(fn, chunk: int):
    """`fn` over the leading axis in chunks of `chunk` (the VAE decoder and the ResNet at 256 x 256 are memory-bound)."""
    def run(x):
        return jnp.concatenate([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    return run


def pretrained_backbone(weights, vae, encoder, *, bf16: bool = False, chunk: int = 32, num_heads: int | None = None) -> Backbone:
    """A pretrained latent DiT (DiT-XL/2: an official `.pt` file or a diffusers folder, `weights`), the
    SD VAE decoder from the local diffusers folder `vae`, and torchvision's ResNet-50 features from the
    local state dict `encoder`, for [`run_dit_sync`][]. `bf16`: the DiT computes in bfloat16 (accelerators, and CPUs with AMX tiles);
    `num_heads`: for an official file of no named size (see `load_dit_official`).
    Nothing is downloaded; a missing path raises an error that says what to pass."""
    from ..models.pretrained import load_dit_diffusers, load_dit_official
    from ..models.resnet import imagenet_normalize, load_resnet50
    from ..models.vae import load_vae_decoder

    for flag, path, what in (("--weights", weights, "the DiT weights: an official .pt file (DiT-XL-2-256x256.pt) or a "
                              "diffusers DiT folder"), ("--vae", vae, "a local diffusers AutoencoderKL folder (e.g. "
                              "sd-vae-ft-ema: config.json + diffusion_pytorch_model.safetensors)"),
                             ("--encoder", encoder, "torchvision's resnet50 state dict (e.g. resnet50-11ad3fa6.pth)")):
        if path is None or not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: not found. Pass {what}; nothing is downloaded.")
    kw = {"dtype": jnp.bfloat16} if bf16 else {}
    model = load_dit_diffusers(weights, **kw) if os.path.isdir(weights) else load_dit_official(weights, num_heads=num_heads, **kw)
    if model.num_classes <= 0:
        raise ValueError(f"{weights}: the protocols need a class-conditional DiT (num_classes > 0).")
    decoder, net = load_vae_decoder(vae), load_resnet50(encoder)
    dec = jax.jit(lambda z, m=nnx.split(decoder): jnp.clip(nnx.merge(*m).decode(z.astype(jnp.float32)), -1, 1))
    enc = jax.jit(lambda x, m=nnx.split(net): nnx.merge(*m).features(imagenet_normalize((x + 1) / 2)))
    size = model.input_size
    return Backbone(model=model, schedule=VPSchedule.linear(1000), shape=(size, size, model.in_channels),
                    encoder=_chunked(enc, chunk), decode=_chunked(dec, chunk), clip=None,
                    description={"weights": os.path.abspath(weights), "vae": os.path.abspath(vae),
                                 "encoder": os.path.abspath(encoder), "bf16": bool(bf16)})


def _spread_pairs(z):
    """The pair batch (2, B, ...) split over all devices along B when there are several and they divide it."""
    n = jax.device_count()
    if n == 1 or z.shape[1] % n:
        return z
    from jax.sharding import NamedSharding, PartitionSpec

    from ..models.sharding import data_mesh

    return jax.device_put(z, NamedSharding(data_mesh(), PartitionSpec(None, "data")))


# ------------------------------------------------------------------------------------------------ the protocols


def _starts(cfg: DiTSync, shape, key):
    """`n_pairs` paired seeds (2, S, ...) from eq (67): a shared start and an antisymmetric perturbation."""
    k_z, k_xi = jax.random.split(key)
    z = jax.random.normal(k_z, (cfg.n_pairs,) + tuple(shape), jnp.float32)
    return _spread_pairs(jnp.stack(replica_init(k_xi, z, cfg.init_eps)))


def protocol1(pair_eps, schedule: VPSchedule, encoder, cfg: DiTSync, *, g: float, shape, key, decode=None, clip=1.0,
              shared_noise: bool = False) -> dict:
    r"""Protocol I at one coupling: for every k of `cfg.intervention_points()` and every paired seed,
    the pair coupled at `g` for the first k DDIM steps ($\eta = 1$) and independent after (with
    `shared_noise`: g = 0 throughout and shared noise draws for the first k steps, Figure 5's control).
    All k and seeds run as one batch.

    `pair_eps`: a [`DiTPairEps`][] whose labels cover `len(k) * n_pairs` pairs; `encoder(images)` the
    features; `decode` maps the final states to images (default: none). **Returns:** `k` (K,), `t`
    the timestep at which each k decouples, and the per-seed curves `cosine`, `coarse`, `fine` (S, K).
    """
    ks = cfg.intervention_points()
    ts = timesteps(schedule.T, cfg.num_steps)
    cut_of = [int(ts[k]) if k < len(ts) else -1 for k in ks]
    s = cfg.n_pairs
    z = _starts(cfg, shape, jax.random.fold_in(key, 0))
    z_pair = _spread_pairs(jnp.tile(z, (1, len(ks)) + (1,) * len(shape)))      # (2, K * S, ...), k-major
    cuts = jnp.repeat(jnp.asarray(cut_of, jnp.int32), s)
    out = sample_replicas(pair_eps, schedule, jax.random.fold_in(key, 1), z_pair, g=0.0 if shared_noise else g,
                          decouple_at=cuts, num_steps=cfg.num_steps, eta=1.0, shared_noise=shared_noise, clip=clip)
    x1, x2 = (out[r] if decode is None else decode(out[r]) for r in range(2))
    cos = np.asarray(_feature_cosine(encoder, x1, x2), np.float64)
    coarse, fine = (np.asarray(a, np.float64) for a in coarse_fine_similarity(x1, x2, cfg.coarse_size))
    curves = lambda a: a.reshape(len(ks), s).T  # noqa: E731
    return {"k": np.asarray(ks), "t": np.asarray(cut_of), "cosine": curves(cos), "coarse": curves(coarse), "fine": curves(fine),
            "example": np.asarray(jnp.stack([x1.reshape(len(ks), s, *x1.shape[1:])[:, 0], x2.reshape(len(ks), s, *x2.shape[1:])[:, 0]]))}


def protocol2(pair_eps, schedule: VPSchedule, cfg: DiTSync, *, g: float, shape, key, clip=1.0) -> dict:
    r"""Protocol II at one coupling: deterministic DDIM of `n_pairs` paired seeds coupled at constant
    `g`; each block's fixed difference modes from the first step (eq 43); the normalised energies
    (eq 75-76) at every step. **Returns:** `eigenvalues` (depth, K), and per step, block and seed the
    mean energy of the leading and trailing bands of `n_band` modes, `lead` and `trail` (steps, depth, S)."""
    z_pair = _starts(cfg, shape, jax.random.fold_in(key, 0))
    ts = timesteps(schedule.T, cfg.num_steps)
    modes = block_modes(hidden_differences(pair_eps, z_pair, int(ts[0]), g=g))
    e = np.asarray(mode_energy_trajectory(pair_eps, schedule, z_pair, modes, g=g, num_steps=cfg.num_steps, clip=clip), np.float64)
    nb = cfg.n_band
    return {"eigenvalues": np.asarray(modes.eigenvalues), "lead": e[..., :nb].mean(-1), "trail": e[..., -nb:].mean(-1),
            "t": np.asarray(ts)}


def _boot_ratio(lead, trail, n_boot, seed):
    """Percentile 95% interval of mean(trail) / mean(lead) over seeds resampled with replacement."""
    if n_boot == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, lead.shape[-1], (n_boot, lead.shape[-1]))
    r = trail[idx].mean(-1) / lead[idx].mean(-1)
    lo, hi = np.quantile(r, [0.025, 0.975])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ the run


def _save_npz(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)


def _gname(g: float) -> str:
    return f"{g:.2f}".replace(".", "p")


def run_dit_sync(cfg: DiTSync, out, *, backbone: Backbone | None = None, progress: bool = True) -> dict:
    """Run both protocols into `out` (each coupling's result saved as it completes, so a stopped run
    resumes where it was) and write the figures, `table.md`, `table.json` and `summary.json`.

    `backbone`: the model to run on (e.g. [`pretrained_backbone`][] for DiT-XL/2); by default the
    MNIST DiT and digit classifier are trained (or reused) in `out`. **Returns:** the summary."""
    cfg.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`out` {out} is an existing file, not a directory.")
    with RunLock(out, "dit-sync run"):
        cfg_file = out / "dit_sync.json"
        record = cfg.to_json() | ({"backbone": backbone.description} if backbone is not None else {})
        if cfg_file.exists():
            saved = json.loads(cfg_file.read_text())
            if saved != record:
                diff = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
                raise ValueError(f"{out} holds a dit-sync run with other settings (fields {diff}); use another --out.")
        else:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(cfg_file, record)
        timing = {}
        t0 = time.perf_counter()
        history, accuracy = None, None
        if backbone is None:
            model, history = train_mnist_dit(cfg, out, progress=progress)
            classifier, accuracy = train_digit_classifier(cfg, out, progress=progress)
            backbone = Backbone(model=model, schedule=VPSchedule.linear(cfg.T), shape=(28, 28, 1),
                                encoder=jax.jit(lambda x, m=nnx.split(classifier): nnx.merge(*m).features(x)))
            quality_file = out / "eval" / "quality.json"
            if not quality_file.exists():
                (out / "eval").mkdir(parents=True, exist_ok=True)
                q = sample_quality(model, classifier, cfg, per_class=cfg.quality_per_class)
                q.pop("samples")
                _write_json(quality_file, q)
        timing["model_and_classifier_s"] = time.perf_counter() - t0
        model, schedule, encoder = backbone.model, backbone.schedule, backbone.encoder
        if not cfg.label < model.num_classes:
            raise ValueError(f"`label` must be a class of the model, in [0, {model.num_classes}); got {cfg.label}.")
        if cfg.num_steps > schedule.T:
            raise ValueError(f"`num_steps` must be at most the model's T = {schedule.T}; got {cfg.num_steps}.")
        if jax.device_count() > 1:
            from ..models.sharding import data_mesh, replicate

            replicate(model, data_mesh())
        (out / "eval").mkdir(exist_ok=True)
        key = jax.random.key(cfg.seed + 1000)
        n1 = len(cfg.intervention_points()) * cfg.n_pairs
        pair1 = dit_pair_eps(model, jnp.full((n1,), cfg.label, jnp.int32))
        pair2 = dit_pair_eps(model, jnp.full((cfg.n_pairs,), cfg.label, jnp.int32))
        jobs = [("p1", g) for g in cfg.gs] + [("p1c", 0.0)] + [("p2", g) for g in cfg.p2_gs]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="dit-sync: protocols", unit="run")
        t1 = time.perf_counter()
        try:
            for kind, g in jobs:
                path = out / "eval" / f"{kind}_g{_gname(g)}.npz"
                if not path.exists():
                    if kind == "p2":
                        res = protocol2(pair2, schedule, cfg, g=g, shape=backbone.shape, key=key, clip=backbone.clip)
                    else:
                        res = protocol1(pair1, schedule, encoder, cfg, g=g, shape=backbone.shape, key=key, decode=backbone.decode,
                                        clip=backbone.clip, shared_noise=kind == "p1c")
                    _save_npz(path, res)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        timing["protocols_s"] = time.perf_counter() - t1
        summary = summarize(cfg, out, classifier_accuracy=accuracy, history=history, T=schedule.T)
        if (out / "eval" / "quality.json").exists():
            summary["sample_quality"] = json.loads((out / "eval" / "quality.json").read_text())
        summary["timing_s"] = timing
        _write_json(out / "summary.json", summary)
        write_figures(cfg, out, summary)
        _write_table(out, summary)
        return summary


def _fit(k, curves, cfg, salt):
    fit = fit_sigmoid(k, curves, n_boot=cfg.n_boot, key=jax.random.key(cfg.seed + salt))
    return {"midpoint": fit.midpoint, "ci": list(fit.interval), "boot_failed": fit.boot_failed, "params": fit.params.tolist(),
            "median": fit.median.tolist(), "q25": np.quantile(curves, 0.25, axis=0).tolist(),
            "q75": np.quantile(curves, 0.75, axis=0).tolist()}


def summarize(cfg: DiTSync, out, *, classifier_accuracy=None, history=None, T: int | None = None) -> dict:
    """Fits and verdicts from the saved per-coupling results in `out/eval` (see `run_dit_sync`)."""
    out = Path(out)
    load = lambda kind, g: dict(np.load(out / "eval" / f"{kind}_g{_gname(g)}.npz"))  # noqa: E731
    p1 = {}
    for i, g in enumerate(cfg.gs):
        r = load("p1", g)
        p1[g] = {"k": r["k"].tolist(), "t": r["t"].tolist(), "cosine": _fit(r["k"], r["cosine"], cfg, 10 * i),
                 "coarse": _fit(r["k"], r["coarse"], cfg, 10 * i + 1), "fine": _fit(r["k"], r["fine"], cfg, 10 * i + 2)}
        p1[g]["gap"] = p1[g]["fine"]["midpoint"] - p1[g]["coarse"]["midpoint"]
    rc = load("p1c", 0.0)
    control = {"k": rc["k"].tolist(), "cosine": _fit(rc["k"], rc["cosine"], cfg, 97)}
    ts = timesteps(cfg.T if T is None else T, cfg.num_steps)
    known = sorted([(0.0, control["cosine"]["midpoint"])] + [(g, p1[g]["cosine"]["midpoint"]) for g in cfg.gs])
    p2 = {}
    for g in cfg.p2_gs:
        r = load("p2", g)
        fitted = [(a, b) for a, b in known if np.isfinite(b)]
        if fitted:  # the Protocol I midpoint at g (interpolated between the couplings measured)
            k_spec, source = float(np.interp(g, *zip(*fitted, strict=True))), "protocol1"
        else:  # no Protocol I fit converged: the middle step, and the summary says so
            k_spec, source = float("nan"), "no Protocol I midpoint: the middle step"
        step = int(np.clip(round(k_spec), 0, cfg.num_steps - 1)) if fitted else cfg.num_steps // 2
        lead, trail = r["lead"][step], r["trail"][step]                         # (depth, S)
        ratio = trail.mean(-1) / lead.mean(-1)
        depth = lead.shape[0]
        ci_last = _boot_ratio(lead[-1], trail[-1], cfg.n_boot, cfg.seed + 5)
        p2[g] = {"k_spec": k_spec, "step_source": source, "step": step, "t": int(ts[step]), "R": ratio.tolist(), "R_last_ci": list(ci_last),
                 "lead_mean": lead.mean(-1).tolist(), "lead_std": lead.std(-1).tolist(),
                 "trail_mean": trail.mean(-1).tolist(), "trail_std": trail.std(-1).tolist(),
                 "R_time_last": (r["trail"][:, -1].mean(-1) / r["lead"][:, -1].mean(-1)).tolist(),
                 "max_abs_log_R_block": int(np.argmax(np.abs(np.log(ratio)))),
                 "first_half_max_abs_log_R": float(np.max(np.abs(np.log(ratio[: max(depth // 2, 1)]))))}
    summary = {"config": cfg.to_json(), "classifier_test_accuracy": classifier_accuracy,
               "final_train_loss": history[-1]["loss"] if history else None,
               "protocol1": {f"{g:g}": v for g, v in p1.items()}, "control": control,
               "protocol2": {f"{g:g}": v for g, v in p2.items()}}
    summary["claims"] = _claims(cfg, p1, p2)
    return summary


def _claims(cfg: DiTSync, p1: dict, p2: dict) -> dict:
    """The paper's four claims, each with the numbers measured here and the rule that reads them."""
    claims = {}
    g_lo, g_hi = min(p2), max(p2)
    r0 = p2[g_lo]["R"][-1]
    gap = bool(p2[g_lo]["R_last_ci"][0] > 1)
    claims["gap_at_g0"] = {"claim": f"a gap exists at g = {g_lo:g}: trailing modes keep more energy than leading ones in the last block "
                           "(R > 1, the bootstrap interval above 1)",
                           "R_last": r0, "R_last_ci": p2[g_lo]["R_last_ci"], "agrees": gap}
    rs = [p2[g]["R"][-1] for g in sorted(p2)]
    # the next two presuppose the first: with no gap at the smallest g there is nothing to collapse or localise
    claims["collapse_toward_g1"] = {"claim": f"the gap collapses as g grows toward 1: given a gap at g = {g_lo:g}, abs(log R) in the "
                                    f"last block is smaller at the largest g ({g_hi:g})",
                                    "g": sorted(p2), "R_last": rs,
                                    "agrees": bool(gap and abs(math.log(rs[-1])) < abs(math.log(rs[0])))}
    p = p2[g_lo]
    depth = len(p["R"])
    claims["localised_in_last_blocks"] = {
        "claim": f"at g = {g_lo:g} the gap is localised in the last blocks: given a gap, abs(log R) is largest in the last third of "
                 "the blocks and larger there than anywhere in the first half",
        "R_per_block": p["R"], "max_block": p["max_abs_log_R_block"], "first_half_max_abs_log_R": p["first_half_max_abs_log_R"],
        "agrees": bool(gap and p["max_abs_log_R_block"] >= depth - max(depth // 3, 1)
                       and abs(math.log(p["R"][-1])) > p["first_half_max_abs_log_R"])}
    gaps = {f"{g:g}": p1[g]["gap"] for g in p1}
    ok = [v > 0 for v in gaps.values() if np.isfinite(v)]
    claims["coarse_before_fine"] = {"claim": "coarse commits before fine: t_coarse < t_fine (eq 73's gap > 0) at every g",
                                    "gap_steps": gaps, "agrees": bool(ok and all(ok) and len(ok) == len(gaps))}
    return claims


def _fmt(v, ci=None):
    if v is None or not np.isfinite(v):
        return "n/a"
    s = f"{v:.1f}"
    if ci is not None and all(np.isfinite(c) for c in ci):
        s += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return s


def _write_table(out: Path, summary: dict) -> None:
    lines = ["# dit-sync: Protocol I (Table 1) and Protocol II", ""]
    q = summary.get("sample_quality")
    if q is not None:
        lines += [f"The model: final training loss {summary['final_train_loss']:.4f}; the feature classifier's test accuracy "
                  f"{summary['classifier_test_accuracy']:.3f}; {q['match']:.0%} of conditional samples (10 per digit, DDIM eta = 1) "
                  f"classified as their digit ({q['confident_match']:.0%} with p >= 0.9).", ""]
    lines += ["Midpoints in reverse steps k of the sampler (k coupled steps before the intervention), 95% bootstrap intervals.", "",
             "| g | speciation k [95% CI] | k_coarse | k_fine | gap k_fine - k_coarse (eq 73) |", "|---|---|---|---|---|"]
    rows = []
    for g, r in summary["protocol1"].items():
        lines.append(f"| {g} | {_fmt(r['cosine']['midpoint'], r['cosine']['ci'])} | {_fmt(r['coarse']['midpoint'], r['coarse']['ci'])} "
                     f"| {_fmt(r['fine']['midpoint'], r['fine']['ci'])} | {_fmt(r['gap'])} |")
        rows.append({"g": float(g), "speciation": r["cosine"]["midpoint"], "ci": r["cosine"]["ci"], "k_coarse": r["coarse"]["midpoint"],
                     "k_fine": r["fine"]["midpoint"], "gap": r["gap"]})
    c = summary["control"]["cosine"]
    lines += ["", f"Uncoupled control (shared noise until k, Figure 5): speciation k = {_fmt(c['midpoint'], c['ci'])}.", "",
              "| g (Protocol II) | step k | R last block [95% CI] | R per block |", "|---|---|---|---|"]
    p2rows = []
    for g, r in summary["protocol2"].items():
        lines.append(f"| {g} | {r['step']} | {r['R'][-1]:.2f} [{r['R_last_ci'][0]:.2f}, {r['R_last_ci'][1]:.2f}] | "
                     + ", ".join(f"{x:.2f}" for x in r["R"]) + " |")
        p2rows.append({"g": float(g), "step": r["step"], "R": r["R"], "R_last_ci": r["R_last_ci"]})
    lines += ["", "| claim (the paper) | measured here | agrees |", "|---|---|---|"]
    for name, claim in summary["claims"].items():
        lines.append(f"| {claim['claim']} | {_claim_numbers(name, claim)} | {'yes' if claim['agrees'] else 'no'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _write_json(out / "table.json", {"protocol1": rows, "control": {"speciation": c["midpoint"], "ci": c["ci"]},
                                     "protocol2": p2rows, "claims": summary["claims"]})


def _claim_numbers(name: str, c: dict) -> str:
    if name == "gap_at_g0":
        return f"R = {c['R_last']:.2f} [{c['R_last_ci'][0]:.2f}, {c['R_last_ci'][1]:.2f}]"
    if name == "collapse_toward_g1":
        return ", ".join(f"R({g:g}) = {r:.2f}" for g, r in zip(c["g"], c["R_last"], strict=True))
    if name == "localised_in_last_blocks":
        return f"max at block {c['max_block'] + 1} of {len(c['R_per_block'])}; R last {c['R_per_block'][-1]:.2f}; " \
               f"first-half max abs(log R) {c['first_half_max_abs_log_R']:.2f}"
    return ", ".join(f"g={g}: {_fmt(v)}" for g, v in c["gap_steps"].items())


def write_figures(cfg: DiTSync, out, summary: dict) -> list[Path]:
    """Figures 1-10 of the paper from `summary`: Protocol I cosine curves per g with the fits
    (`protocol1_cosine.png`, Figures 2-4), the uncoupled control (`protocol1_control.png`, Figure 5),
    the coarse / fine curves (`protocol1_coarse_fine.png`, Figures 6-8), the depth sweeps of the band
    energies and R (`protocol2_depth.png`, Figures 1, 9, 10) and R over the trajectory in the last
    block (`protocol2_time.png`)."""
    from ..plotting import plot_dit_coarse_fine, plot_dit_control, plot_dit_cosine, plot_dit_depth, plot_dit_time, save_figure

    out = Path(out)
    figs = {"protocol1_cosine.png": plot_dit_cosine(summary), "protocol1_control.png": plot_dit_control(summary),
            "protocol1_coarse_fine.png": plot_dit_coarse_fine(summary), "protocol2_depth.png": plot_dit_depth(summary),
            "protocol2_time.png": plot_dit_time(summary)}
    return [save_figure(f, out / name, dpi=110) for name, f in figs.items()]
