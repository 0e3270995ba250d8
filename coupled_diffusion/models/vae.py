r"""The decoder of diffusers' `AutoencoderKL` (the Stable Diffusion VAE that DiT-XL/2 samples in) in
Flax NNX, channels-last, and its loader from a local diffusers folder.

```python
vae = cd.load_vae_decoder("path/to/sd-vae-ft-ema")   # config.json + diffusion_pytorch_model.safetensors
images = vae.decode(latents)                          # latents (B, 32, 32, 4) from the DiT -> (B, 256, 256, 3) in ~[-1, 1]
```

The architecture is diffusers' `Decoder`: `post_quant_conv` (1x1), `conv_in`, a middle block
(resnet, single-head self-attention, resnet), one up block per width in reverse order, each
`layers_per_block + 1` resnets and (all but the last) a nearest-neighbour 2x upsampling with a 3x3
convolution, then group norm, SiLU and `conv_out`. The resnets have no time embedding, and every
group norm uses eps 1e-6 (diffusers' decoder). [`VAEDecoder.decode`][] divides by `scaling_factor`
first, as `DiTPipeline` does; calling the decoder maps unscaled latents, as `vae.decode(z).sample`.

Only the decoder's keys are read; the encoder's (`encoder.*`, `quant_conv.*`) are skipped. Checkpoints
in the old attention naming (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .pretrained import _conv as _conv_weight, _linear, _Mapping, _read_diffusers, _same
from .unet import SelfAttention, _conv, _GroupNorm, _Shortcut, _torch_uniform, upsample_conv

__all__ = ["VAEDecoder", "load_vae_decoder", "vae_decoder_from_diffusers"]

_EPS = 1e-6


class _Resnet(nnx.Module):
    """diffusers' `ResnetBlock2D` without a time embedding: GN, SiLU, conv, GN, SiLU, conv, plus the (1x1) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _GroupNorm(cin, groups, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, **kw)
        self.norm2 = _GroupNorm(cout, groups, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, **kw)
        self.conv_shortcut = _Shortcut(cin, cout, kernel_init=_torch_uniform, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv2(self.norm2(self.conv1(self.norm1(x, silu=True)), silu=True))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Mid(nnx.Module):
    def __init__(self, c: int, groups: int, attention: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([_Resnet(c, c, groups, **kw) for _ in range(2)])
        self.attentions = (nnx.List([SelfAttention(c, c, groups=groups, eps=_EPS, **kw)]) if attention else None)

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Up(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([_Resnet(cin if j == 0 else cout, cout, groups, **kw) for j in range(n)])
        self.upsample = _conv(cout, cout, **kw) if upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsample is None else upsample_conv(x, self.upsample)


class VAEDecoder(nnx.Module):
    r"""diffusers' `AutoencoderKL` decoder (see the module docstring); inputs and outputs channels-last.

    **Arguments:** `latent_channels`, `out_channels`, `block_out_channels` (widths, first = the
    output resolution's), `layers_per_block`, `norm_num_groups`, `scaling_factor` (0.18215 for
    the SD VAE), `post_quant_conv`, `mid_attention` as in the diffusers config; `dtype` the compute
    dtype (group norms and the attention softmax stay float32).
    """

    def __init__(self, *, latent_channels: int = 4, out_channels: int = 3, block_out_channels=(128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32, scaling_factor: float = 0.18215,
                 post_quant_conv: bool = True, mid_attention: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = tuple(int(c) for c in block_out_channels)
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = latent_channels
        self.post_quant_conv = (_Shortcut(latent_channels, latent_channels, kernel_init=_torch_uniform, **kw)
                                if post_quant_conv else None)
        self.conv_in = _conv(latent_channels, widths[-1], **kw)
        self.mid_block = _Mid(widths[-1], norm_num_groups, mid_attention, **kw)
        rev = widths[::-1]
        self.up_blocks = nnx.List([_Up(rev[max(i - 1, 0)], c, layers_per_block + 1, norm_num_groups, i < len(rev) - 1, **kw)
                                   for i, c in enumerate(rev)])
        self.conv_norm_out = _GroupNorm(widths[0], norm_num_groups, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = _conv(widths[0], out_channels, **kw)

    def __call__(self, z):
        """Unscaled latents `z` (B, h, w, latent_channels) -> images (B, 2^(n-1) h, 2^(n-1) w, out_channels)."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"`z` must be (B, h, w, {self.latent_channels}) latents, channels last; got shape {z.shape}.")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid_block(self.conv_in(z))
        for up in self.up_blocks:
            h = up(h)
        return self.conv_out(self.conv_norm_out(h, silu=True))

    def decode(self, latents):
        """The images of a diffusion model's latents: `self(latents / scaling_factor)`, as `DiTPipeline` decodes."""
        return self(latents / self.scaling_factor)


_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _key(path: tuple) -> str:
    """Our parameter path -> the diffusers `AutoencoderKL` key."""
    parts = []
    for i, p in enumerate(map(str, path)):
        last = i == len(path) - 1
        if p == "norm" and not last:
            continue
        if last:
            parts.append({"kernel": "weight", "scale": "weight"}.get(p, p))
        else:
            parts.append({"upsample": "upsamplers.0.conv", "to_out": "to_out.0"}.get(p, p))
    key = ".".join(parts)
    return key if key.startswith("post_quant_conv") else "decoder." + key


def vae_decoder_from_diffusers(config: Mapping, tensors: Mapping[str, np.ndarray], **overrides) -> VAEDecoder:
    """A [`VAEDecoder`][] from a diffusers `AutoencoderKL` config dict and its state dict (name -> array)."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"config.json describes a {cls!r}; only 'AutoencoderKL' can be loaded as a VAEDecoder.")
    widths = list(config.get("block_out_channels", (64,)))
    ups = list(config.get("up_block_types", ["UpDecoderBlock2D"] * len(widths)))
    if any(u != "UpDecoderBlock2D" for u in ups) or len(ups) != len(widths):
        raise ValueError(f"up_block_types {ups}: the decoder supports one 'UpDecoderBlock2D' per width ({len(widths)}).")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"config.json has act_fn={config['act_fn']!r}; the decoder supports only 'silu'.")
    tensors = dict(tensors)
    for k in list(tensors):  # the old attention naming, renamed as diffusers does on load
        head, _, leaf = k.rpartition(".")
        stem, _, name = head.rpartition(".")
        if ".attentions." in k and name in _OLD_ATTENTION:
            tensors[f"{stem}.{_OLD_ATTENTION[name]}.{leaf}"] = tensors.pop(k)
    kwargs = dict(latent_channels=int(config.get("latent_channels", 4)), out_channels=int(config.get("out_channels", 3)),
                  block_out_channels=tuple(widths), layers_per_block=int(config.get("layers_per_block", 1)),
                  norm_num_groups=int(config.get("norm_num_groups", 32)), scaling_factor=float(config.get("scaling_factor", 0.18215)),
                  post_quant_conv=bool(config.get("use_post_quant_conv", True)),
                  mid_attention=bool(config.get("mid_block_add_attention", True)))
    kwargs.update(overrides)
    abstract = nnx.eval_shape(lambda: VAEDecoder(**kwargs, rngs=nnx.Rngs(0)))
    m = _Mapping(tensors, "diffusers AutoencoderKL")
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        ndim = len(var.get_value().shape)
        key = _key(path)
        if ndim == 2 and key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")):
            m.add(path, key, _linear)                       # (out, in) or an old (out, in, 1, 1)
        else:
            m.add(path, key, _conv_weight if ndim == 4 else _linear if ndim == 2 else _same)
    m.used.update(k for k in tensors if k.startswith(("encoder.", "quant_conv.")))
    return m.build(abstract)


def load_vae_decoder(path: str | os.PathLike, *, variant: str | None = None, **overrides) -> VAEDecoder:
    r"""Load the [`VAEDecoder`][] from a local diffusers `AutoencoderKL` folder (`config.json` and
    `diffusion_pytorch_model.safetensors`; or a pipeline folder with `vae/`), without torch.
    Nothing is downloaded; a missing or damaged file raises an error that names it."""
    config, tensors = _read_diffusers(path, variant, "vae")
    return vae_decoder_from_diffusers(config, tensors, **overrides)
