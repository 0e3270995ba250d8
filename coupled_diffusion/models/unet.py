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

from . import onednn
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


def _per_channel(s, c):
    """(B, G) per-group values -> (B, 1, C), each channel taking its group's."""
    return jnp.repeat(s, c // s.shape[-1], axis=-1)[:, None, :]


def group_norm(x, scale, bias, groups: int, eps: float, *, shift=None, silu: bool = False):
    r"""Group norm of `x` (B, ..., C) with `groups` channel groups, as `nnx.GroupNorm` computes it,
    optionally of `x + shift[:, None, ..., :]` (a per-sample channel offset, `shift` (B, C); the
    residual blocks' time embedding) and followed by SiLU: `silu(group_norm(x + shift))` in one pass.

    On XLA:CPU with float32 operands it runs as one fused kernel of the CPU extension (statistics
    and normalisation of each sample while it is in cache; `onednn.group_norm_ffi`), elsewhere as
    XLA ops (variance E[x^2] - E[x]^2, clamped at 0). The backward pass is hand-derived either way:
    two per-channel reductions (of `dy` and `dy * x`) and one elementwise pass, fewer than
    reverse-mode autodiff of the forward builds.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % groups:
        raise ValueError(f"`groups` ({groups}) must divide the {c} channels of `x`.")
    shift = jnp.zeros((b, c), x.dtype) if shift is None else shift
    if shift.shape != (b, c):
        raise ValueError(f"`shift` must have shape (batch, channels) = {(b, c)}; got {shift.shape}.")
    return _group_norm(x, scale, bias, shift, int(groups), float(eps), bool(silu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _group_norm(x, scale, bias, shift, groups, eps, silu):
    return _group_norm_fwd(x, scale, bias, shift, groups, eps, silu)[0]


def _group_norm_xla(xr, scale, bias, shift, groups, eps, silu):
    c = xr.shape[-1]
    xr = xr + shift[:, None, :]
    n = xr.shape[1] * (c // groups)
    s, s2 = _channel_sums(xr, jnp.square(xr))
    mean, mean_sq = (v[:, 0].reshape(-1, groups, c // groups).sum(-1) / n for v in (s, s2))  # (B, G)
    rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)
    a = scale * _per_channel(rstd, c)
    y = xr * a + (bias - _per_channel(mean, c) * a)
    return (nnx.silu(y) if silu else y), mean, rstd


def _group_norm_fwd(x, scale, bias, shift, groups, eps, silu):
    b, c = x.shape[0], x.shape[-1]
    xr = x.reshape(b, -1, c)
    xla = functools.partial(_group_norm_xla, groups=groups, eps=eps, silu=silu)
    if onednn.usable(xr, scale, bias, shift):
        fused = functools.partial(onednn.group_norm_ffi, groups=groups, eps=eps, silu=silu)
        y, mean, rstd = jax.lax.platform_dependent(xr, scale, bias, shift, cpu=fused, default=xla)
    else:
        y, mean, rstd = xla(xr, scale, bias, shift)
    return y.reshape(x.shape), (x, scale, bias, shift, mean, rstd)


def _group_norm_bwd(groups, eps, silu, res, dy):
    x, scale, bias, shift, mean, rstd = res
    b, c = x.shape[0], x.shape[-1]
    xr, dyr = x.reshape(b, -1, c) + shift[:, None, :], dy.reshape(b, -1, c)
    mean, rstd = _per_channel(mean, c), _per_channel(rstd, c)
    n = xr.shape[1] * (c // groups)
    if silu:  # through the SiLU first, at the recomputed pre-activation
        pre = (xr - mean) * (rstd * scale) + bias
        sig = jax.nn.sigmoid(pre)
        dyr = dyr * (sig * (1 + pre * (1 - sig)))
    group_mean = lambda v: _per_channel(v[:, 0].reshape(b, groups, -1).sum(-1) / n, c)  # noqa: E731
    sum_dy, sum_dy_x = _channel_sums(dyr, dyr * xr)                         # (B, 1, C)
    sum_dy_xhat = (sum_dy_x - mean * sum_dy) * rstd
    m_dy = group_mean(scale * sum_dy)                                        # group mean of scale * dy
    m_dy_xhat = group_mean(scale * sum_dy_xhat)                              # ... of scale * dy * xhat
    dx = dyr * (scale * rstd) - xr * (rstd * rstd * m_dy_xhat) + (mean * rstd * rstd * m_dy_xhat - rstd * m_dy)
    return dx.reshape(x.shape), sum_dy_xhat.sum((0, 1)), sum_dy.sum((0, 1)), dx.sum(1)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class _GroupNorm(nnx.Module):
    """Group norm computed in float32 whatever the compute dtype (parameters held by `nnx.GroupNorm`);
    `shift` and `silu` as in [`group_norm`][]."""

    def __init__(self, channels: int, groups: int, eps: float, *, param_dtype, rngs):
        if channels % groups:
            raise ValueError(f"`num_groups` ({groups}) must divide every width; {channels} channels do not split evenly.")
        self.groups, self.eps = groups, eps
        self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                                  rngs=rngs)

    def __call__(self, x, *, shift=None, silu: bool = False):
        scale, bias = (p.get_value().astype(jnp.float32) for p in (self.norm.scale, self.norm.bias))
        shift = None if shift is None else shift.astype(jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.groups, self.eps, shift=shift, silu=silu).astype(x.dtype)


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
        h = self.conv1(self.norm1(x, silu=True))
        h = self.norm2(h, shift=self.time_emb_proj(nnx.silu(temb)), silu=True)  # silu(norm2(h + temb)), fused
        h = self.conv2(self.dropout(h, deterministic=deterministic, rngs=rngs))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def attention(qkv, heads: int):
    r"""Multi-head softmax attention from a fused projection: `qkv` (B, P, 3C) holds q | k | v (head h
    in channels h D ... (h + 1) D - 1 of each, D = C / heads); returns (B, P, C), heads merged, as
    `jax.nn.dot_product_attention` (scale $1/\sqrt D$) computes it.

    On XLA:CPU with float32 operands it is one kernel of the CPU extension (`onednn.attention_ffi`:
    logits, softmax and the weighted sum of each (sample, head) in cache, no head transposes; XLA:CPU's
    row reductions make its softmax the slow part otherwise); elsewhere XLA ops. The backward pass
    rebuilds the probabilities from the saved log-sum-exp, either way.
    """
    b, p, c3 = qkv.shape
    if c3 % 3 or (c3 // 3) % heads:
        raise ValueError(f"`qkv` must be (batch, positions, 3 x heads x head_dim) with heads = {heads}; got {qkv.shape}.")
    return _attention(qkv, int(heads))


def _split_heads(qkv, heads):
    b, p, c3 = qkv.shape
    return qkv.reshape(b, p, 3, heads, c3 // 3 // heads).transpose(2, 0, 3, 1, 4)  # (3, B, H, P, D): q, k, v


def _attention_xla(qkv, heads):
    q, k, v = _split_heads(qkv, heads)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bqhd", jnp.exp(s - lse[..., None]), v)
    return out.reshape(qkv.shape[0], qkv.shape[1], -1), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attention(qkv, heads):
    return _attention_fwd(qkv, heads)[0]


def _attention_fwd(qkv, heads):
    xla = functools.partial(_attention_xla, heads=heads)
    if onednn.usable(qkv):
        out, lse = jax.lax.platform_dependent(qkv, cpu=functools.partial(onednn.attention_ffi, heads=heads), default=xla)
    else:
        out, lse = xla(qkv)
    return out, (qkv, out, lse)


def _attention_bwd(heads, res, dout):
    qkv, out, lse = res
    b, p, c = out.shape
    q, k, v = _split_heads(qkv, heads)
    scale = q.shape[-1] ** -0.5
    prob = jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale - lse[..., None])
    do = dout.reshape(b, p, heads, -1).transpose(0, 2, 1, 3)                       # (B, H, P, D)
    row = (dout * out).reshape(b, p, heads, -1).sum(-1).transpose(0, 2, 1)         # (B, H, P): sum_d do o
    dv = jnp.einsum("bhqk,bhqd->bhkd", prob, do)
    ds = prob * (jnp.einsum("bhqd,bhkd->bhqk", do, v) - row[..., None]) * scale
    dq, dk = jnp.einsum("bhqk,bhkd->bhqd", ds, k), jnp.einsum("bhqk,bhqd->bhkd", ds, q)
    return (jnp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(qkv.shape),)


_attention.defvjp(_attention_fwd, _attention_bwd)


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
        proj = (self.to_q, self.to_k, self.to_v)  # one (C, 3C) projection instead of three
        h, kernel, _ = _operands(self.to_q, h)
        kernel = jnp.concatenate([m.kernel.get_value().astype(kernel.dtype) for m in proj], axis=1)
        bias = jnp.concatenate([m.bias.get_value().astype(kernel.dtype) for m in proj])
        out = attention((h @ kernel + bias).astype(jnp.float32), self.heads).astype(h.dtype)  # softmax in float32
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

        h = self.conv_out(self.conv_norm_out(h, silu=True))
        return h.astype(jnp.float32)
