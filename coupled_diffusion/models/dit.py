r"""Diffusion Transformer (Peebles and Xie 2023) in Flax NNX, channels-last.

```python
model = cd.DiT.from_config("DiT-S/2", input_size=32, in_channels=4, rngs=nnx.Rngs(0))
eps = model(x, t, y)                                   # x: (B, H, W, C), t: (B,), y: (B,) int labels
eps, hidden = model(x, t, y, return_hidden=True)      # plus the per-block token states
```

The architecture follows the paper and its reference code: a patch embedding (a
`patch x patch` convolution with stride `patch`), a fixed 2-D sine-cosine position
embedding (not a parameter), a sinusoidal timestep embedder with a two-layer MLP, a
class-label embedder with one extra "null" row for classifier-free guidance (label
dropout during training), `depth` adaLN-Zero blocks and a final adaLN layer; with
`learn_sigma` the output has `2 C` channels. adaLN modulations and the final projection are
zero-initialised, so a fresh model outputs zeros and every block starts as the identity.

Mixed precision: `dtype=jnp.bfloat16` computes in bfloat16 with float32 parameters
(`param_dtype`); layer norms, the softmax and the adaLN modulations stay in float32, and every
matrix product takes bfloat16 operands and accumulates and returns float32
(`preferred_element_type`), rounded to bfloat16 where the next product reads it. Besides the
accuracy, that is the only form XLA:CPU hands to YNNPACK's AMX kernels (Sapphire Rapids and later;
it does so for most of the dense layers, not for the attention's batched products): a bfloat16
product with a bfloat16 result takes a slow path there (`benchmarks/README.md`, dit_replica.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Transformer size: `depth` blocks of width `hidden_size` with `num_heads` heads, patch `patch_size`."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


# Table 1 of the DiT paper
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS = {f"DiT-{n}/{p}": DiTConfig(d, h, k, p) for n, (d, h, k) in _SIZES.items() for p in (2, 4, 8)}


def sincos_pos_embed(hidden_size: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D sine-cosine position embedding of MAE/DiT, shape `(grid_size**2, hidden_size)`.

    Half the channels encode the column (x) coordinate and half the row (y) coordinate, each
    as `[sin(pos * w_k), cos(pos * w_k)]` with `w_k = 10000^{-k / (D/4)}`; tokens in row-major order.
    """
    if hidden_size % 4:
        raise ValueError(f"`hidden_size` must be divisible by 4 for the 2-D sin-cos embedding, got {hidden_size}.")
    omega = 1.0 / 10000 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size / 4.0))
    coords = np.arange(grid_size, dtype=np.float64)
    gx, gy = np.meshgrid(coords, coords)  # gx varies along columns (w), gy along rows (h)

    def one(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(gx), one(gy)], axis=1).astype(np.float32)


def timestep_embedding(t, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0):
    """Sinusoidal embedding of (possibly fractional) timesteps: `[cos(t w_k), sin(t w_k)]`, shape `(B, dim)`.

    `w_k = max_period^{-k / (dim/2 - freq_shift)}`, `k = 0 .. dim/2 - 1`. The DiT reference code uses
    `freq_shift = 0`; diffusers' `DiTTransformer2DModel` uses `freq_shift = 1`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _part(init, axis: str | None, *spec):
    """`init` annotated with the partition spec (`"fsdp"` standing for `axis`), or plain `init` when `axis` is None."""
    if axis is None:
        return init
    return nnx.with_partitioning(init, tuple(axis if d == "fsdp" else d for d in spec))


def _accumulate(dtype):
    """`preferred_element_type` for products computed in `dtype`: float32 for a sub-32-bit float, else None."""
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.float32
    return None


@jax.custom_jvp
def _add_bias(y, bias):
    """`y + bias` (broadcast over the leading axes); its gradient sums the batch axis with a dot.

    XLA:CPU turns the column sum of a large bias gradient into a `reduce-window` that ran at about
    1.5 GB/s inside the DiT's training step (35 ms for each `(32, 256, 1536)` MLP gradient).
    Here the tangent broadcasts `bias` over the leading axis as an outer product with a ones
    vector that XLA cannot see through, so its transpose contracts that axis in a matrix-vector
    product, and only a `(256, 1536)` sum is left to reduce: 4.5 against 19.8 ms alone, with a
    smaller rounding error (the product sums 32 terms per entry, then a tree reduction follows).
    The forward and the `jvp` are exact; `jax.jvp` pays the outer product.
    """
    return y + bias


@_add_bias.defjvp
def _add_bias_jvp(primals, tangents):
    y, bias = primals
    dy, dbias = tangents
    lead = y.shape[0]
    rest = jnp.broadcast_to(dbias, y.shape[1:]).reshape(1, -1)
    ones = jax.lax.optimization_barrier(jnp.ones((lead, 1), dbias.dtype))
    outer = jax.lax.dot_general(ones, rest, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y + bias, dy + outer.reshape(y.shape).astype(dy.dtype)


_DOT_BIAS_MIN_SIZE = 1 << 18  # smaller activations keep the plain broadcast add (the sum is cheap there)


class _Dense(nnx.Linear):
    """`nnx.Linear` (same parameters) whose bias gradient is summed by [`_add_bias`][] on large batches."""

    def __call__(self, x):
        if self.bias is None or x.ndim < 3 or x.shape[0] < 2 or x.size < _DOT_BIAS_MIN_SIZE:
            return super().__call__(x)
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        kw = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kw)  # as nnx.Linear
        return _add_bias(y, bias)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nnx.Module):
    def __init__(self, hidden_size: int, *, frequency_size: int = 256, freq_shift: float = 0.0, dtype=None,
                 param_dtype=jnp.float32, fsdp_axis=None, rngs):
        init = _part(nnx.initializers.normal(0.02), fsdp_axis, None, "fsdp")
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        self.frequency_size, self.freq_shift = frequency_size, freq_shift
        self.linear_1 = nnx.Linear(frequency_size, hidden_size, **kw)
        self.linear_2 = nnx.Linear(hidden_size, hidden_size, **kw)

    def __call__(self, t):
        return self.linear_2(nnx.silu(self.linear_1(timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift))))


class LabelEmbedder(nnx.Module):
    """Class embeddings with a null class (index `num_classes`) used when a label is dropped."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, param_dtype=jnp.float32, fsdp_axis=None,
                 rngs):
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nnx.Embed(num_classes + (dropout_prob > 0), hidden_size, param_dtype=param_dtype,
                                         embedding_init=_part(nnx.initializers.normal(0.02), fsdp_axis, None, "fsdp"),
                                         rngs=rngs)

    def __call__(self, y, *, train: bool = False, key=None, force_drop=None):
        if force_drop is not None:
            y = jnp.where(force_drop, self.num_classes, y)
        elif train and self.dropout_prob > 0:
            if key is None:
                raise ValueError("Label dropout in training needs a `key`.")
            y = jnp.where(jax.random.bernoulli(key, self.dropout_prob, y.shape), self.num_classes, y)
        return self.embedding_table(y)


def softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over the last two axes (tokens, head dim), the softmax in float32 at
    least (bfloat16 compute: both products accumulate in float32) and float64 kept."""
    acc = _accumulate(q.dtype)
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=acc)
    soft = jnp.promote_types(scores.dtype, jnp.float32)
    scores = scores.astype(soft) * (1.0 / math.sqrt(q.shape[-1]))
    # Normalised late: exp(s - max) @ v, then divided by the row sums, so the division runs over
    # (tokens, head_dim) instead of (tokens, tokens) and the weights are never materialised
    # normalised (1.8x faster than jax.nn.softmax(...) @ v for DiT-S/2's 256 tokens on XLA:CPU).
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = jnp.matmul(e.astype(v.dtype), v, preferred_element_type=acc).astype(soft) / e.sum(axis=-1, keepdims=True)
    return out.astype(v.dtype)


class Attention(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, dtype=None, param_dtype=jnp.float32, fsdp_axis=None, rngs):
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        init = _part(nnx.initializers.xavier_uniform(), fsdp_axis, None, "fsdp")
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, preferred_element_type=_accumulate(dtype), rngs=rngs)
        self.num_heads = num_heads
        self.qkv = nnx.Linear(hidden_size, 3 * hidden_size, **kw)
        self.proj = _Dense(hidden_size, hidden_size, **kw)

    def __call__(self, x, replica_g=None):
        b, n, c = x.shape
        h = self.num_heads
        # q, k and v are projected straight into the head-major layout (b, h, n, c/h), one einsum
        # each over the matching columns of the fused `qkv` kernel (the parameters are those of
        # the reference code's single Linear). On XLA:CPU at DiT-S/2 sizes this cuts the attention
        # layer's forward + backward from 232 to 164 ms against projecting to (b, n, 3 c) and
        # transposing (the transpose's backward and the slices were materialised copies), and the
        # head-major batched matmuls are 2.6x faster forward than jax.nn.dot_product_attention's
        # (b, n, h, d) layout (benchmarks/README.md).
        x, kernel, bias = self.qkv.promote_dtype((x, self.qkv.kernel[...], self.qkv.bias[...]), dtype=self.qkv.dtype)
        kernel, bias = kernel.reshape(c, 3, h, c // h), bias.reshape(3, h, 1, c // h)
        acc = self.qkv.preferred_element_type
        q, k, v = ((jnp.einsum("bnc,chd->bhnd", x, kernel[:, i], preferred_element_type=acc) + bias[i]).astype(x.dtype)
                   for i in range(3))
        if replica_g is None:
            out = softmax_attention(q, k, v)
        else:  # the batch holds two replicas, [first B | second B]: blockwise-softmax coupling (eq 19)
            from .replica import replica_attention

            pair = lambda a: a.reshape((2, b // 2) + a.shape[1:])  # noqa: E731
            out = replica_attention(pair(q), pair(k), pair(v), replica_g).reshape(q.shape)
        out = out.transpose(0, 2, 1, 3)  # (b, n, h, c/h)
        return self.proj(out.reshape(b, n, c))


class Mlp(nnx.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float, *, dtype=None, param_dtype=jnp.float32, fsdp_axis=None, rngs):
        init = _part(nnx.initializers.xavier_uniform(), fsdp_axis, None, "fsdp")
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, preferred_element_type=_accumulate(dtype), rngs=rngs)
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = _Dense(hidden_size, inner, **kw)
        self.fc2 = _Dense(inner, hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (shift, scale, gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, mlp_norm_eps: float = 1e-6, dtype=None,
                 param_dtype=jnp.float32, fsdp_axis=None, rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, fsdp_axis=fsdp_axis, rngs=rngs)
        self.norm1 = nnx.LayerNorm(hidden_size, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)
        self.attn = Attention(hidden_size, num_heads, **kw)
        self.norm2 = nnx.LayerNorm(hidden_size, epsilon=mlp_norm_eps, use_bias=False, use_scale=False, rngs=rngs)
        self.mlp = Mlp(hidden_size, mlp_ratio, **kw)
        self.adaLN_modulation = nnx.Linear(hidden_size, 6 * hidden_size, param_dtype=param_dtype,
                                           kernel_init=_part(nnx.initializers.zeros, fsdp_axis, None, "fsdp"), rngs=rngs)

    def __call__(self, x, c, replica_g=None):
        mods = jnp.split(self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = _modulate(self.norm1(x.astype(jnp.float32)), shift_msa, scale_msa)
        x = x + (gate_msa[:, None] * self.attn(h.astype(self.dtype or h.dtype), replica_g)).astype(x.dtype)
        h = _modulate(self.norm2(x.astype(jnp.float32)), shift_mlp, scale_mlp)
        return x + (gate_mlp[:, None] * self.mlp(h.astype(self.dtype or h.dtype))).astype(x.dtype)


class FinalLayer(nnx.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, param_dtype=jnp.float32, fsdp_axis=None,
                 rngs):
        zeros = nnx.initializers.zeros
        self.norm_final = nnx.LayerNorm(hidden_size, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)
        self.linear = nnx.Linear(hidden_size, patch_size * patch_size * out_channels, param_dtype=param_dtype,
                                 kernel_init=_part(zeros, fsdp_axis, "fsdp", None), rngs=rngs)
        self.adaLN_modulation = nnx.Linear(hidden_size, 2 * hidden_size, param_dtype=param_dtype,
                                           kernel_init=_part(zeros, fsdp_axis, None, "fsdp"), rngs=rngs)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(_modulate(self.norm_final(x.astype(jnp.float32)), shift, scale))


class DiT(nnx.Module):
    r"""The Diffusion Transformer; see the module docstring. Build named sizes with [`DiT.from_config`][].

    Call as `model(x, t, y=None, *, train=False, key=None, force_drop=None, return_hidden=False)`:
    `x` of shape `(B, H, W, C)` with `H = W = input_size`, `t` of shape `(B,)`, `y` integer
    labels `(B,)` (required iff `num_classes > 0`). Returns `(B, H, W, C_out)`, and with
    `return_hidden=True` also the token states after each block, shape `(depth, B, N, D)`.
    With `replica_g` the batch is two replicas, `[first B/2 | second B/2]`, coupled by replica
    attention (eq 19 of the DiT paper) in the blocks `replica_blocks` (default all); prefer
    [`coupled_dit`][], which takes the replica-first layout.

    `timestep_freq_shift` and `mlp_norm_eps` default to the DiT reference code's constants (0 and
    1e-6); diffusers' port uses 1 and its `norm_eps` (1e-5), and [`load_dit_diffusers`][] sets them so.

    FSDP: with `fsdp_axis="data"` every weight matrix carries an NNX partitioning annotation that
    splits one of its dimensions over that mesh axis (the output dimension, or the width input of
    the final projection, so every split dimension is a multiple of `hidden_size`); built under
    `jax.set_mesh(mesh)` each device then holds only its slice of every weight (biases and norms are
    replicated), and XLA gathers the slices where a layer needs them. `hidden_size` must be a
    multiple of the axis size. See `coupled_diffusion.models.sharding`.
    """

    def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, timestep_freq_shift: float = 0.0, mlp_norm_eps: float = 1e-6,
                 dtype=None, param_dtype=jnp.float32, fsdp_axis: str | None = None, rngs: nnx.Rngs):
        if input_size % patch_size:
            raise ValueError(f"`input_size` ({input_size}) must be divisible by `patch_size` ({patch_size}).")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.dtype = num_classes, dtype
        self.x_embedder = nnx.Conv(in_channels, hidden_size, (patch_size, patch_size), strides=patch_size, padding="VALID",
                                   dtype=dtype, param_dtype=param_dtype,
                                   kernel_init=_part(nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3), fsdp_axis,
                                                     None, None, None, "fsdp"), rngs=rngs)
        self.pos_embed = nnx.Variable(jnp.asarray(sincos_pos_embed(hidden_size, input_size // patch_size)))  # fixed
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift, param_dtype=param_dtype,
                                           fsdp_axis=fsdp_axis, rngs=rngs)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob, param_dtype=param_dtype,
                                         fsdp_axis=fsdp_axis, rngs=rngs)
                           if num_classes > 0 else None)
        self.blocks = nnx.List([DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_norm_eps=mlp_norm_eps, dtype=dtype,
                                         param_dtype=param_dtype, fsdp_axis=fsdp_axis, rngs=rngs)
                                for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, param_dtype=param_dtype,
                                      fsdp_axis=fsdp_axis, rngs=rngs)

    @classmethod
    def from_config(cls, name: str, **kwargs) -> "DiT":
        """A named size of the DiT paper (`"DiT-S/2"` ... `"DiT-XL/8"`); other arguments as in `DiT`."""
        if name not in DIT_CONFIGS:
            raise ValueError(f"Unknown DiT config {name!r}; choose from {sorted(DIT_CONFIGS)}.")
        c = DIT_CONFIGS[name]
        return cls(depth=c.depth, hidden_size=c.hidden_size, num_heads=c.num_heads, patch_size=c.patch_size, **kwargs)

    def unpatchify(self, x):
        b, n, _ = x.shape
        p, c, g = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(b, g, g, p, p, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, c)

    def __call__(self, x, t, y=None, *, train: bool = False, key=None, force_drop=None, return_hidden: bool = False,
                 replica_g=None, replica_blocks=None):
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
            raise ValueError(f"`x` must have shape (B, {self.input_size}, {self.input_size}, {self.in_channels}) "
                             f"(channels last), got {x.shape}.")
        if (y is None) != (self.y_embedder is None):
            raise ValueError("Pass labels `y` exactly when the model is class-conditional (num_classes > 0).")
        b = x.shape[0]
        h = self.x_embedder(x).reshape(b, -1, self.pos_embed.value.shape[-1])
        h = h.astype(jnp.float32) + self.pos_embed.value[None]
        c = self.t_embedder(jnp.broadcast_to(t, (b,)))
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, train=train, key=key, force_drop=force_drop)
        if replica_g is not None and b % 2:
            raise ValueError(f"With `replica_g` the batch holds two replicas, [first B | second B]; got an odd batch {b}.")
        coupled = set(range(len(self.blocks)) if replica_blocks is None else replica_blocks) if replica_g is not None else set()
        hidden = []
        for i, block in enumerate(self.blocks):
            h = block(h, c, replica_g if i in coupled else None)
            if return_hidden:
                hidden.append(h)
        out = self.unpatchify(self.final_layer(h, c).astype(jnp.float32))
        return (out, jnp.stack(hidden)) if return_hidden else out
