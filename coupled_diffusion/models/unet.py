r"""A compact eps-prediction U-Net (Ronneberger et al. 2015; Ho et al. 2020) in Flax NNX, channels-last.

```python
model = cd.UNet(in_channels=2, rngs=nnx.Rngs(0))       # the paper's MNIST size: 2 x 28 x 28, 28 -> 14 -> 7
eps = model(x, t)                                       # x: (B, H, W, C), t: (B,) (integer or fractional steps)
```

The layout is the DDPM U-Net as diffusers' `UNet2DModel` builds it, with the same module names,
so that its checkpoints load with [`load_unet_diffusers`][] and its forward can be matched:

- a sinusoidal timestep embedding (`[cos, sin]`, width `block_channels[0]`) and a two-layer SiLU
  MLP to `4 * block_channels[0]`;
- `conv_in`, then one *down level* per entry of `block_channels`: `layers_per_block` residual
  blocks (group norm, SiLU, 3x3 conv, plus a projection of the time embedding; a 1x1 shortcut when
  the width changes), each followed by self-attention where `attention[level]` is true, and a
  stride-2 3x3 convolution to halve the resolution on every level but the last;
- a middle block (residual, self-attention, residual);
- mirrored *up levels* with `layers_per_block + 1` residual blocks each, every one consuming the
  matching skip connection (concatenated on channels), and nearest-neighbour 2x upsampling plus a
  3x3 convolution;
- group norm, SiLU and a 3x3 `conv_out`.

The input side must halve cleanly `len(block_channels) - 1` times (28 -> 14 -> 7 with three
levels; 32 and 64 with up to six and seven). `dtype=jnp.bfloat16` computes in bfloat16 with float32
parameters; group norms and softmax statistics stay in float32.

On XLA:CPU the 3x3 convolutions run through oneDNN when it is installed (`onednn.conv2d`;
`pip install 'coupled_diffusion[onednn]'`), the library PyTorch's CPU convolutions use; elsewhere
they are `lax` convolutions. The parameters and results are the same either way.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .dit import timestep_embedding
from .onednn import conv2d


def _torch_uniform(key, shape, dtype=jnp.float32):
    """PyTorch's default weight law U(+-1/sqrt(fan_in)): the values of `nnx.initializers.variance_scaling(1/3,
    "fan_in", "uniform")` (tested equal), drawn as one flat vector and reshaped.

    JAX's default (partitionable) threefry counts over the flattened index, so the values are the
    same, but XLA:CPU compiles a 1-D draw in about 0.17 s against 0.5-1.1 s for a 4-D one, and a
    U-Net's distinct kernel shapes made building one take 10-12 s, all of it compilation.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a weight kernel has at least 2 axes (inputs ..., outputs), got shape {shape}.")
    fan_in = math.prod(shape[:-1])
    variance = jnp.array(1 / 3 / fan_in, dtype=dtype)
    return jax.random.uniform(key, (math.prod(shape),), dtype, -1).reshape(shape) * jnp.sqrt(3 * variance).astype(dtype)


def _operands(module, x):
    """`x`, `module`'s kernel and bias (or None) in its compute dtype (`module.dtype`, else the promoted one)."""
    kernel = module.kernel.get_value()
    dtype = module.dtype or jnp.result_type(x, kernel)
    bias = None if module.bias is None else module.bias.get_value().astype(dtype)
    return x.astype(dtype), kernel.astype(dtype), bias


class _Conv(nnx.Conv):
    """`nnx.Conv` (same parameters and results) computed by `onednn.conv2d`: oneDNN on XLA:CPU, lax elsewhere."""

    def __call__(self, x):
        x, kernel, bias = _operands(self, x)
        return conv2d(x, kernel, bias, self.strides, self.padding)


class _Shortcut(nnx.Linear):
    """The residual blocks' 1x1 shortcut: an `nnx.Linear` over channels (diffusers' 1x1 conv, reshaped), computed
    as a 1x1 `onednn.conv2d`, whose weight gradient is far faster than XLA:CPU's 100k-long-contraction dot."""

    def __call__(self, x):
        x, kernel, bias = _operands(self, x)
        return conv2d(x, kernel[None, None], bias, 1, "VALID")


def _conv(cin, cout, kernel=3, stride=1, *, dtype, param_dtype, rngs):
    pad = (kernel - 1) // 2
    return _Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), dtype=dtype,
                 param_dtype=param_dtype, kernel_init=_torch_uniform, rngs=rngs)


# rows (or columns) of a 3x3 kernel that each tap of a 2x2 sub-pixel kernel sums, per output phase
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)  # numpy: no JAX work at import
_PHASE_PAD = ((1, 0), (0, 1))


def upsample_conv(h, conv: nnx.Conv):
    r"""`conv(nearest_upsample_2x(h))` for a 3x3, stride-1, zero-padded `conv`, without the upsampling.

    Each of the four output phases `y[:, 2i + a, 2j + b]` is a 2x2 convolution of `h` itself
    with the 3x3 kernel's taps summed in pairs, so the work is 4 x 4 taps on the low-resolution
    grid instead of 9 taps on the high-resolution one (2.25x fewer FLOPs) and the upsampled
    activation is never stored. Same parameters and outputs as the plain form, up to rounding.
    """
    h, kernel, bias = _operands(conv, h)  # the bias is added by each phase's convolution
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    rows = []
    for a in range(2):
        cols = []
        for b in range(2):
            k = jnp.einsum("rk,sl,klio->rsio", taps[a], taps[b], kernel)
            cols.append(conv2d(h, k, bias, 1, (_PHASE_PAD[a], _PHASE_PAD[b])))
        rows.append(jnp.stack(cols, axis=3))                      # (B, H, W, 2, C): column phase b
    y = jnp.stack(rows, axis=2)                                    # (B, H, 2, W, 2, C): row phase a
    bsz, hh, _, ww, _, c = y.shape
    return y.reshape(bsz, 2 * hh, 2 * ww, c)


def _channel_sums(*arrays):
    """Per-channel sums over the positions of (B, P, C) arrays, each as (B, 1, C).

    The positions are folded into the lanes first, (B, P / r, r C) with r C about 128, so that
    XLA:CPU reduces over a wide contiguous axis rather than a 16- or 32-wide one (1.1-1.4x
    faster group norms at 28 x 28 on this project's CPU), then the r copies of each channel
    are added."""
    b, p, c = arrays[0].shape
    r = max(1, 128 // c)
    while p % r:
        r //= 2
    return tuple(a.reshape(b, p // r, r * c).sum(1).reshape(b, r, c).sum(1)[:, None, :] for a in arrays)


def _group_mean(s, groups, n):
    """(B, 1, C) per-channel sums -> the mean over each group of channels (and the n positions), per channel."""
    b, c = s.shape[0], s.shape[-1]
    return jnp.repeat(s.reshape(b, groups, -1).sum(-1) / n, c // groups, axis=-1)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, groups: int, eps: float):
    r"""Group norm of `x` (B, ..., C) with `groups` channel groups, as `nnx.GroupNorm` computes it
    (fast variance E[x^2] - E[x]^2, clamped at 0), with a hand-derived backward pass.

    The backward pass needs two per-channel reductions (of `dy` and `dy * x`) and one
    elementwise pass over the activations, fewer than reverse-mode autodiff of the forward builds.
    """
    return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
    b, c = x.shape[0], x.shape[-1]
    xr = x.reshape(b, -1, c)
    n = xr.shape[1] * (c // groups)
    s, s2 = _channel_sums(xr, jnp.square(xr))
    mean, mean_sq = _group_mean(s, groups, n), _group_mean(s2, groups, n)
    rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)
    a = scale * rstd
    y = xr * a + (bias - mean * a)
    return y.reshape(x.shape), (x, scale, mean, rstd)


def _group_norm_bwd(groups, eps, res, dy):
    x, scale, mean, rstd = res
    b, c = x.shape[0], x.shape[-1]
    xr, dyr = x.reshape(b, -1, c), dy.reshape(b, -1, c)
    n = xr.shape[1] * (c // groups)
    sum_dy, sum_dy_x = _channel_sums(dyr, dyr * xr)                         # (B, 1, C)
    sum_dy_xhat = (sum_dy_x - mean * sum_dy) * rstd
    m_dy = _group_mean(scale * sum_dy, groups, n)                           # group mean of scale * dy
    m_dy_xhat = _group_mean(scale * sum_dy_xhat, groups, n)                 # ... of scale * dy * xhat
    dx = dyr * (scale * rstd) - xr * (rstd * rstd * m_dy_xhat) + (mean * rstd * rstd * m_dy_xhat - rstd * m_dy)
    return dx.reshape(x.shape), sum_dy_xhat.sum((0, 1)), sum_dy.sum((0, 1))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class _GroupNorm(nnx.Module):
    """Group norm computed in float32 whatever the compute dtype (parameters held by `nnx.GroupNorm`)."""

    def __init__(self, channels: int, groups: int, eps: float, *, param_dtype, rngs):
        if channels % groups:
            raise ValueError(f"`num_groups` ({groups}) must divide every width; {channels} channels do not split evenly.")
        self.groups, self.eps = groups, eps
        self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                                  rngs=rngs)

    def __call__(self, x):
        scale, bias = (p.get_value().astype(jnp.float32) for p in (self.norm.scale, self.norm.bias))
        return group_norm(x.astype(jnp.float32), scale, bias, self.groups, self.eps).astype(x.dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, temb: int, *, groups: int, eps: float, dropout: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _GroupNorm(cin, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, **kw)
        self.time_emb_proj = nnx.Linear(temb, cout, kernel_init=_torch_uniform, **kw)
        self.norm2 = _GroupNorm(cout, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)  # its key comes with the call, so the model holds no RNG state
        self.conv2 = _conv(cout, cout, **kw)
        self.conv_shortcut = _Shortcut(cin, cout, kernel_init=_torch_uniform, **kw) if cin != cout else None

    def __call__(self, x, temb, *, deterministic: bool = True, rngs=None):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :].astype(h.dtype)
        h = self.conv2(self.dropout(nnx.silu(self.norm2(h)), deterministic=deterministic, rngs=rngs))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nnx.Module):
    """Group norm, multi-head self-attention over the `H W` positions, output projection, residual."""

    def __init__(self, channels: int, head_dim: int, *, groups: int, eps: float, dtype, param_dtype, rngs):
        if channels % head_dim:
            raise ValueError(f"`attention_head_dim` ({head_dim}) must divide the width {channels} of an attention level.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = channels // head_dim
        self.group_norm = _GroupNorm(channels, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.to_q, self.to_k, self.to_v = (nnx.Linear(channels, channels, kernel_init=_torch_uniform, **kw) for _ in range(3))
        self.to_out = nnx.Linear(channels, channels, kernel_init=_torch_uniform, **kw)

    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(b, hh * ww, c)
        split = lambda z: z.reshape(b, hh * ww, self.heads, c // self.heads)
        q, k, v = split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, hh * ww, c)
        return x + self.to_out(out).reshape(b, hh, ww, c)


class _Level(nnx.Module):
    def __init__(self, resnets, attentions, resample):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.resample = resample


class UNet(nnx.Module):
    r"""The compact U-Net; see the module docstring.

    **Arguments:**

    - `in_channels`: input (and, by default, output) channels `C` of `(B, H, W, C)` inputs.
    - `out_channels`: output channels (default `in_channels`).
    - `block_channels`: width of each resolution level, finest first.
    - `layers_per_block`: residual blocks per down level (up levels get one more).
    - `attention`: per level, whether its residual blocks are followed by self-attention
        (default: only the coarsest level); the middle block always has attention unless
        `mid_attention=False`.
    - `num_groups`: groups of every group norm.
    - `norm_eps`: their epsilon.
    - `attention_head_dim`: channels per attention head.
    - `dropout`: dropout inside residual blocks; acts in `model(x, t, train=True, rngs=nnx.Rngs(dropout=key))`.
    - `dtype`, `param_dtype`: compute and parameter dtypes.
    """

    def __init__(self, *, in_channels: int = 2, out_channels: int | None = None,
                 block_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention: tuple[bool, ...] | None = None, mid_attention: bool = True, num_groups: int = 8,
                 norm_eps: float = 1e-5, attention_head_dim: int = 8, dropout: float = 0.0, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        block_channels = tuple(int(c) for c in block_channels)
        if not block_channels or min(block_channels) <= 0:
            raise ValueError(f"`block_channels` must be a non-empty tuple of positive widths, got {block_channels}.")
        if layers_per_block < 1:
            raise ValueError(f"`layers_per_block` must be at least 1, got {layers_per_block}.")
        n = len(block_channels)
        attention = tuple(attention) if attention is not None else (False,) * (n - 1) + (True,)
        if len(attention) != n:
            raise ValueError(f"`attention` needs one flag per level ({n}), got {len(attention)}.")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.block_channels, self.dtype, self.dropout_rate = block_channels, dtype, dropout
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(groups=num_groups, eps=norm_eps)
        c0, temb = block_channels[0], 4 * block_channels[0]

        self.conv_in = _conv(in_channels, c0, **kw)
        self.time_linear_1 = nnx.Linear(c0, temb, param_dtype=param_dtype, kernel_init=_torch_uniform, rngs=rngs)
        self.time_linear_2 = nnx.Linear(temb, temb, param_dtype=param_dtype, kernel_init=_torch_uniform, rngs=rngs)

        res = lambda cin, cout: ResnetBlock(cin, cout, temb, dropout=dropout, **norm, **kw)
        attn = lambda c: SelfAttention(c, attention_head_dim, **norm, **kw)
        skips, down, cin = [c0], [], c0
        for level, cout in enumerate(block_channels):
            resnets, attns = [], []
            for _ in range(layers_per_block):
                resnets.append(res(cin, cout))
                attns.append(attn(cout) if attention[level] else None)
                cin = cout
                skips.append(cout)
            last = level == n - 1
            down.append(_Level(resnets, [a for a in attns if a] or None, None if last else _conv(cout, cout, 3, 2, **kw)))
            if not last:
                skips.append(cout)
        self.down_blocks = nnx.List(down)

        self.mid_resnet_1 = res(cin, cin)
        self.mid_attention = attn(cin) if mid_attention else None
        self.mid_resnet_2 = res(cin, cin)

        up = []
        for i, cout in enumerate(reversed(block_channels)):
            level = n - 1 - i
            resnets = []
            for _ in range(layers_per_block + 1):
                resnets.append(res(cin + skips.pop(), cout))
                cin = cout
            attns = [attn(cout) for _ in resnets] if attention[level] else None
            up.append(_Level(resnets, attns, _conv(cout, cout, **kw) if level > 0 else None))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = _GroupNorm(block_channels[0], num_groups, norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = _conv(block_channels[0], self.out_channels, **kw)

    def __call__(self, x, t, *, train: bool = False, rngs: nnx.Rngs | None = None):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"`x` must have shape (B, H, W, {self.in_channels}) (channels last), got {x.shape}.")
        factor = 2 ** (len(self.block_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"The spatial size {x.shape[1:3]} must be divisible by {factor} to halve "
                             f"{len(self.block_channels) - 1} times (block_channels={self.block_channels}).")
        b = x.shape[0]
        drop = dict(deterministic=not train or self.dropout_rate == 0, rngs=rngs)
        if not drop["deterministic"] and rngs is None:
            raise ValueError("Training with dropout > 0 needs `rngs` (e.g. nnx.Rngs(dropout=key)).")
        t_freq = timestep_embedding(jnp.broadcast_to(t, (b,)), self.block_channels[0])
        temb = self.time_linear_2(nnx.silu(self.time_linear_1(t_freq)))

        h = self.conv_in(x.astype(self.dtype or x.dtype))
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, temb, **drop)
                if level.attentions is not None:
                    h = level.attentions[j](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_resnet_1(h, temb, **drop)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid_resnet_2(h, temb, **drop)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb, **drop)
                if level.attentions is not None:
                    h = level.attentions[j](h)
            if level.resample is not None:
                h = upsample_conv(h, level.resample)  # = level.resample(nearest-neighbour 2x upsample of h)

        h = self.conv_out(nnx.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)
