"""MNIST two-channel experiments (Section 5): sample grids, a sample-quality score; Protocols I and II build on these pieces.

Sample quality is measured with a classifier of *pairs*: an MLP trained on real MAIN pairs
`(x, T(x))` (randomly swapped, in [-1, 1]) to predict the digit, and to put mismatched pairs,
smooth random blobs and half-noise pairs in an 11th class, `REJECT` (`fit_pair_classifier`).
`pair_quality` reports the fraction of pairs it labels a digit with probability >= 0.9
("recognisable"), the fraction rejected, and the entropy of the histogram of predicted digits
(diversity; log 10 = 2.30 for uniform classes). The same numbers on held-out real pairs are
the reference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from ..data.mnist import load_mnist
from ..data.pairing import PairedMNIST
from ..diffusion.build import build_data, build_noise
from ..diffusion.samplers import NNXEps, sample


def draw_samples(result, n: int = 16, *, num_steps: int = 50, method: str = "ddpm", seed: int = 0, ema: bool = True,
                 clip: float | None = 1.0):
    """`n` samples `(n, 28, 28, 2)` in [-1, 1] units from a trained run (`TrainResult` or `load_run`).

    `clip` bounds the predicted clean state to `[-clip, clip]` at every step (diffusers'
    `clip_sample`, on by default there too; None: unbounded). Unbounded, a two-class g = 0.5
    model of 1200 steps gave 17% recognisable pairs, bounded 95% (README, "Synchronization
    experiments"); for the all-digit g = 0.3 default run the bound changed little (README).
    """
    c = result.config
    schedule, noise = build_noise(c.noise)
    key_start, key_run = jax.random.split(jax.random.key(seed))
    z_T = noise.sample(key_start, (n, 28, 28, 2))
    model = result.ema_model if ema else result.model
    return sample(NNXEps(model), schedule, noise, key_run, z_T, method=method, num_steps=min(num_steps, c.T),
                  clip=clip).z0


def sample_grid(result, path, *, n: int = 16, num_steps: int = 50, seed: int = 0, method: str = "ddpm",
                clip: float | None = 1.0) -> Path:
    """Save a PNG of `n` samples (`draw_samples`): rows x_A, x_B, u = (x_A + x_B)/2 and v = (x_A - x_B)/sqrt 2 (eq 103)."""
    from ..plotting import plot_pair_grid, save_figure

    z = np.asarray(draw_samples(result, n, num_steps=num_steps, seed=seed, method=method, clip=clip), np.float64)
    return save_figure(plot_pair_grid((z + 1) / 2), path, dpi=80)  # back to [0, 1]


REJECT = 10  # the classifier's 11th class: "not a matched digit pair"


class PairClassifier(nnx.Module):
    """A two-hidden-layer MLP from a `(B, 28, 28, 2)` pair in [-1, 1] to 11 logits: digits 0-9 and `REJECT`."""

    def __init__(self, *, hidden: int = 512, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(28 * 28 * 2, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 11, rngs=rngs)

    def __call__(self, z):
        h = jax.nn.relu(self.l1(z.reshape(z.shape[0], -1)))
        return self.out(jax.nn.relu(self.l2(h)))


def _blobs(key, n: int) -> Float[Array, "n 28 28 2"]:
    """Smooth random shapes in [-1, 1] on a dark background: plausible strokes that are no digits."""
    k1, k2, k3 = jax.random.split(key, 3)
    coarse = jax.random.normal(k1, (n, 7, 7, 1), jnp.float32)
    fine = jax.image.resize(coarse, (n, 28, 28, 1), "cubic")
    level = jax.random.uniform(k2, (n, 1, 1, 1), jnp.float32, minval=0.5, maxval=1.5)
    x = jnp.clip(2 * (fine - level), 0, 1)
    other = jnp.where(jax.random.bernoulli(k3, 0.5, (n, 1, 1, 1)), x, jnp.clip(2 * (fine - level + 0.3), 0, 1) - x)
    return jnp.concatenate([x, other], -1) * 2 - 1


def fit_pair_classifier(data, *, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> PairClassifier:
    """Train a `PairClassifier` with Adam (cosine decay).

    Half of each batch are MAIN pairs of `data` (a `PairedMNIST`) labelled by their digit; the
    other half are labelled `REJECT`: mismatched pairs `(x_i, T(x_j))` of different digits,
    smooth random blobs, and MAIN pairs with one channel replaced by noise. Without these an MLP
    gives confident digit labels to anything, including the blobs of an untrained model.
    """
    if data.pairing != "main":
        raise ValueError(f"the pair classifier is trained on MAIN pairs; got `pairing`={data.pairing!r}.")
    if steps < 1 or batch_size < 4 or batch_size > len(data):
        raise ValueError(f"need `steps` >= 1 and 4 <= `batch_size` <= {len(data)}, got {steps} and {batch_size}.")
    model = PairClassifier(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    h, q = batch_size // 2, batch_size // 4

    def step(i, carry):
        params, opt = carry
        key = jax.random.fold_in(jax.random.key(seed + 1), i)
        ka, kb, ks, kb2, kn, kblob = jax.random.split(key, 6)
        a = jax.random.randint(ka, (batch_size,), 0, len(data))
        b = jax.random.randint(kb, (batch_size,), 0, len(data))
        main = data.batch(a, a, ks)
        mismatched = data.batch(a, b, kb2)
        noisy = main.at[..., 1].set(jnp.clip(jax.random.normal(kn, main.shape[:-1], main.dtype), -1, 1))
        z = jnp.concatenate([main[:h], mismatched[h:h + q // 2], noisy[h + q // 2:h + q], _blobs(kblob, batch_size - h - q)])
        ya, yb = data.labels[a], data.labels[b]
        y = jnp.concatenate([ya[:h], jnp.where(ya == yb, ya, REJECT)[h:h + q // 2],
                             jnp.full((batch_size - h - q // 2,), REJECT)])

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(z)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params, _ = jax.jit(lambda p, o: jax.lax.fori_loop(0, steps, step, (p, o)))(params, tx.init(params))
    return nnx.merge(graphdef, params)


def pair_quality(classifier: PairClassifier, z, *, threshold: float = 0.9) -> dict:
    """Classifier statistics of pairs `z` `(N, 28, 28, 2)` in [-1, 1]: see the module docstring.

    Returns `recognisable` (the fraction labelled a digit, not `REJECT`, with probability >=
    `threshold`), `rejected` (the fraction whose top class is `REJECT`), `mean_max_prob`,
    `class_entropy` (nats, of the histogram of the digit predictions), `histogram` (11 counts,
    the last `REJECT`) and `predicted` (the `N` labels).
    """
    z = jnp.asarray(z)
    if z.ndim != 4 or z.shape[1:] != (28, 28, 2):
        raise ValueError(f"`z` must be (N, 28, 28, 2) pairs, got shape {z.shape}.")
    if not bool(jnp.all(jnp.isfinite(z))):
        raise ValueError("`z` holds non-finite values.")
    graphdef, params = nnx.split(classifier)
    prob = np.asarray(jax.jit(lambda p, z: jax.nn.softmax(nnx.merge(graphdef, p)(z)))(params, z), np.float64)
    pred = prob.argmax(-1)
    hist = np.bincount(pred, minlength=11)
    digits = hist[:10][hist[:10] > 0]
    f = digits / max(digits.sum(), 1)
    return dict(recognisable=float(np.mean((pred != REJECT) & (prob.max(-1) >= threshold))),
                rejected=float(np.mean(pred == REJECT)), mean_max_prob=float(prob.max(-1).mean()),
                class_entropy=float(-(f * np.log(f)).sum()), histogram=hist.tolist(), predicted=pred)


def evaluate_run(result, n: int = 256, *, num_steps: int = 50, method: str = "ddpm", clip: float | None = 1.0,
                 seed: int = 0, classifier_steps: int = 2000, classifier: PairClassifier | None = None) -> dict:
    """Sample quality of a trained run: `pair_quality` of `n` samples (`draw_samples`) and of `n` real test pairs.

    The classifier is fitted on MAIN pairs of the run's training images (same transform and
    classes), or `classifier` is used (one fitted so for runs on the same data), and the
    reference pairs come from the test split, so the two rows are comparable.
    Returns `{"samples": ..., "real": ..., "classifier_test_accuracy": ...}` (without the
    per-pair predictions).
    """
    c = result.config
    if classifier is None:
        classifier = fit_pair_classifier(build_data(dataclasses.replace(c.data, pairing="main")), steps=classifier_steps, seed=seed)
    clf = classifier
    x, y = load_mnist("test", c.data_path)
    test = PairedMNIST(x, y, transform=c.transform, pairing="main", classes=c.classes)
    idx = jnp.arange(min(n, len(test)))
    z_real = test.batch(idx, idx, jax.random.key(seed))
    real = pair_quality(clf, z_real)
    acc = float(np.mean(real.pop("predicted") == np.asarray(test.labels[idx])))
    fake = pair_quality(clf, draw_samples(result, n, num_steps=num_steps, method=method, clip=clip, seed=seed))
    fake.pop("predicted")
    return dict(samples=fake, real=real, classifier_test_accuracy=acc, n=int(n))


__all__ = ["REJECT", "PairClassifier", "evaluate_run", "draw_samples", "fit_pair_classifier", "pair_quality", "sample_grid"]
