r"""torchvision's ResNet-50 in Flax NNX (inference), channels-last, and its loader from a local
state dict: the DiT paper's feature encoder for Protocol I (eq 70) at ImageNet scale.

```python
net = cd.load_resnet50("resnet50-11ad3fa6.pth")     # torchvision's state dict; or .safetensors / .npz
f = net.features(cd.imagenet_normalize(images01))   # (B, 2048), the pooled features; net(x): the 1000 logits
```

The architecture is torchvision's `resnet50` (v1.5: the stride of each downsampling bottleneck is
on its 3x3 convolution): a 7x7 stride-2 stem, 3x3 stride-2 max pooling, bottleneck stages of
3, 4, 6, 3 blocks (widths 64-512, expansion 4), global average pooling, a linear classifier.
Batch norms use their running statistics (eval mode), folded into one scale and shift per channel.

A `.pth` / `.pt` file is unpickled with `torch.load(weights_only=True)`, so torch is needed for that
format only; `.safetensors` and `.npz` files with the same key names load without it. Nothing is
downloaded. A missing key, an unexpected key, a shape mismatch or a damaged file raises an error
that names it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .pretrained import _conv as _conv_weight, _linear, _Mapping, _same

__all__ = ["ResNet50", "imagenet_normalize", "load_resnet50", "resnet50_from_state_dict"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images):
    """Images (..., H, W, 3) in [0, 1] -> torchvision's ImageNet input normalisation."""
    return (images - jnp.asarray(IMAGENET_MEAN, images.dtype)) / jnp.asarray(IMAGENET_STD, images.dtype)


class _BatchNorm(nnx.Module):
    """Eval-mode batch norm with torchvision's buffers (eps 1e-5)."""

    def __init__(self, c: int, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((c,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((c,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((c,), param_dtype))

    def __call__(self, x):
        a = self.scale[...] * jax.lax.rsqrt(self.var[...] + 1e-5)
        return x * a.astype(x.dtype) + (self.bias[...] - self.mean[...] * a).astype(x.dtype)


def _conv(cin, cout, k, stride=1, *, dtype, param_dtype, rngs):
    pad = (k - 1) // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class _Bottleneck(nnx.Module):
    def __init__(self, cin: int, width: int, stride: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cout = 4 * width
        self.conv1, self.bn1 = _conv(cin, width, 1, **kw), _BatchNorm(width, param_dtype=param_dtype)
        self.conv2, self.bn2 = _conv(width, width, 3, stride, **kw), _BatchNorm(width, param_dtype=param_dtype)
        self.conv3, self.bn3 = _conv(width, cout, 1, **kw), _BatchNorm(cout, param_dtype=param_dtype)
        self.downsample = (nnx.List([_conv(cin, cout, 1, stride, **kw), _BatchNorm(cout, param_dtype=param_dtype)])
                           if stride != 1 or cin != cout else None)

    def __call__(self, x):
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        h = jax.nn.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(h + skip)


class ResNet50(nnx.Module):
    """torchvision's ResNet-50 (see the module docstring): `features(x)` (B, 2048) and `__call__(x)`
    (B, `num_classes`) from normalised images `x` (B, H, W, 3), channels last."""

    def __init__(self, *, num_classes: int = 1000, layers=(3, 4, 6, 3), dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1, self.bn1 = _conv(3, 64, 7, 2, **kw), _BatchNorm(64, param_dtype=param_dtype)
        cin, stages = 64, []
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1, **kw))
                cin = 4 * width
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def features(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"`x` must be (B, H, W, 3) normalised images, channels last; got shape {x.shape}.")
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                h = block(h)
        return h.astype(jnp.float32).mean((1, 2))

    def __call__(self, x):
        return self.fc(self.features(x))


def _key(path: tuple) -> str:
    """Our parameter path -> torchvision's key (`layer1.0.downsample.1.running_mean`, ...)."""
    *head, leaf = (str(p) for p in path)
    return ".".join(head + [{"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)])


def resnet50_from_state_dict(state: Mapping[str, np.ndarray], **overrides) -> ResNet50:
    """A [`ResNet50`][] from torchvision's `resnet50` state dict (name -> array; `num_batches_tracked` ignored).
    The class count is read from `fc.weight`."""
    state = {k: np.asarray(v) for k, v in state.items()}
    if "fc.weight" not in state:
        raise ValueError("The state dict has no 'fc.weight': not a torchvision resnet50 state dict "
                         f"(first keys: {sorted(state)[:5]}).")
    kwargs = dict(num_classes=int(state["fc.weight"].shape[0])) | overrides
    abstract = nnx.eval_shape(lambda: ResNet50(**kwargs, rngs=nnx.Rngs(0)))
    m = _Mapping(state, "torchvision resnet50")
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        ndim = len(var.get_value().shape)
        m.add(path, _key(path), _conv_weight if ndim == 4 else _linear if ndim == 2 else _same)
    m.used.update(k for k in state if k.endswith("num_batches_tracked"))
    return m.build(abstract)


def load_resnet50(path: str | os.PathLike, **overrides) -> ResNet50:
    """Load [`ResNet50`][] from a local torchvision state dict: `.pth`/`.pt` (needs torch to unpickle),
    `.safetensors` or `.npz`. Nothing is downloaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ResNet-50 weights at {path!r}. Pass a local torchvision state dict (e.g. "
                                "resnet50-11ad3fa6.pth, or the same keys as .safetensors / .npz); nothing is downloaded.")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            from safetensors.numpy import load_file

            state = load_file(path)
        elif ext == ".npz":
            with np.load(path) as f:
                state = dict(f)
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"{path!r} is a PyTorch pickle: reading it needs torch (`pip install torch`), or convert it "
                                  "to .safetensors / .npz once elsewhere.") from e
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict (name -> tensor).")
            state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}
    except (ImportError, ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a truncated pickle, zip or safetensors file raises its reader's own error
        raise ValueError(f"{path!r} could not be read as a state dict ({type(e).__name__}: {str(e)[:200]}); "
                         "the file is damaged or incomplete.") from e
    return resnet50_from_state_dict(state, **overrides)
