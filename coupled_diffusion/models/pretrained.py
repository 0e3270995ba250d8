r"""Load pretrained DiT weights from local files: a diffusers directory or an official `.pt` state dict.

```python
model = load_dit_diffusers("path/to/DiT-XL-2-256")          # config.json + *.safetensors; no torch needed
model = load_dit_official("DiT-XL-2-256x256.pt")             # facebookresearch/DiT; torch only to unpickle
```

Nothing is downloaded: both loaders read only the path they are given. The model is built
abstractly (`nnx.eval_shape`), so no random initialisation is spent on a 675M-parameter DiT, and
every parameter is then filled from the checkpoint. A missing file, a checkpoint key the model has
no place for, a parameter the checkpoint lacks, or a shape mismatch raises an error naming the key
(and both shapes).

The two formats differ in more than key names:

| | DiT reference code | diffusers `DiTTransformer2DModel` |
|---|---|---|
| timestep frequencies | `10000^{-k/128}` | `10000^{-k/127}` (`downscale_freq_shift=1`) |
| layer norm before the MLP | eps 1e-6 | eps `norm_eps` (1e-5) |
| timestep and label embedders | one, shared | one copy per block (identical in converted checkpoints) |
| attention projections | fused `qkv` | separate `to_q`, `to_k`, `to_v` |

Each loader sets `timestep_freq_shift` and `mlp_norm_eps` to its source's constants, so the loaded
model reproduces that source's forward pass; pass them explicitly to override. The Flax DiT has one
shared embedder, as in the paper, so [`load_dit_diffusers`][] checks that the per-block copies are
identical and raises if they are not.
"""

import json
import os
import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .dit import DIT_CONFIGS, DiT, sincos_pos_embed

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def _linear(w):  # PyTorch (out, in) -> Flax (in, out); a 1x1 convolution (out, in, 1, 1) becomes a dense kernel
    w = np.asarray(w)
    return w.reshape(w.shape[0], -1).T


def _conv(w):  # PyTorch (O, I, kh, kw) -> Flax (kh, kw, I, O)
    return np.asarray(w).transpose(2, 3, 1, 0)


def _same(w):
    return np.asarray(w)


class _Mapping:
    """Target parameter path -> (checkpoint key(s), transform), and the bookkeeping for clear errors."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors, self.source = tensors, source
        self.entries: dict[tuple, tuple[str, Callable[[], np.ndarray]]] = {}
        self.used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise ValueError(f"The {self.source} checkpoint has no key {key!r}, which the model needs.")
        self.used.add(key)
        return self.tensors[key]

    def add(self, path: tuple, key: str, transform=_same):
        self.entries[path] = (key, lambda: transform(self.get(key)))

    def add_fused(self, path: tuple, keys: list[str], transform=_linear, axis: int = -1):
        self.entries[path] = ("+".join(keys), lambda: np.concatenate([transform(self.get(k)) for k in keys], axis=axis))

    def build(self, abstract: nnx.Module) -> nnx.Module:
        """A concrete copy of the abstract (`nnx.eval_shape`) model with every variable filled from the checkpoint."""
        graphdef, state = nnx.split(abstract)
        flat = nnx.to_flat_state(state)
        leaves = []
        for path, var in flat:
            if path not in self.entries:
                raise ValueError(f"No checkpoint entry for model parameter {'.'.join(map(str, path))}.")
            key, make = self.entries[path]
            want = var.get_value()
            arr = make()
            if tuple(arr.shape) != tuple(want.shape):
                raw = " + ".join(str(tuple(np.shape(self.tensors[k]))) for k in key.split("+") if k in self.tensors)
                raise ValueError(f"Shape mismatch for {self.source} key {key!r} (model parameter "
                                 f"{'.'.join(map(str, path))}): checkpoint shape {raw or '?'}, which is "
                                 f"{tuple(arr.shape)} in the Flax layout, but the model expects {tuple(want.shape)}.")
            if np.issubdtype(np.asarray(arr).dtype, np.inexact) and not np.all(np.isfinite(arr)):
                raise ValueError(f"The {self.source} checkpoint's {key!r} (model parameter {'.'.join(map(str, path))}) holds "
                                 f"{int(np.size(arr) - np.isfinite(arr).sum())} non-finite values: the file is damaged or "
                                 "the weights diverged in training.")
            leaves.append((path, var.replace(jnp.asarray(arr, dtype=want.dtype))))
        unknown = sorted(set(self.tensors) - self.used)
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise ValueError(f"{len(unknown)} {self.source} checkpoint key(s) have no place in the "
                             f"{type(abstract).__name__}: {shown}.")
        return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _block_entries(m: _Mapping, i: int, names: dict[str, str]):
    """The per-block Linear layers, `names` mapping our sub-path to the checkpoint prefix."""
    for ours, theirs in names.items():
        path = ("blocks", i) + tuple(ours.split("."))
        m.add(path + ("kernel",), f"{theirs}.weight", _linear)
        m.add(path + ("bias",), f"{theirs}.bias")


def _abstract_dit(**kwargs) -> DiT:
    return nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(0)))


def _with_pos_embed(m: _Mapping, hidden: int, grid: int) -> np.ndarray:
    """The DiT's fixed position table is computed, not read (diffusers does not save it); returned for checks."""
    table = sincos_pos_embed(hidden, grid)
    m.entries[("pos_embed",)] = ("<fixed sin-cos>", lambda: table)
    return table


# ----------------------------------------------------------------------------------------------------- diffusers


def _read_diffusers(path: str | os.PathLike, variant: str | None, subfolder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """`config.json` and the safetensors weights of a diffusers model folder (or of `subfolder` in a pipeline folder)."""
    from safetensors.numpy import load_file

    config_file, files = _diffusers_files(os.fspath(path), variant, subfolder)
    try:
        with open(config_file) as f:
            config = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{config_file!r} is not valid JSON ({e}); the model folder is damaged or incomplete.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file!r} holds a JSON {type(config).__name__}, not the model's configuration object.")
    tensors = {}
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"Weight shard {file!r}, listed in the index, is missing.")
        try:
            tensors.update(load_file(file))
        except Exception as e:  # safetensors raises its own SafetensorError (a truncated or damaged file)
            raise ValueError(f"{file!r} could not be read as safetensors ({type(e).__name__}: {e}); "
                             "the file is damaged or incomplete.") from e
    return config, tensors


def _diffusers_files(path: str, variant: str | None, subfolder: str) -> tuple[str, list[str]]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No diffusers model directory at {path!r}. Pass the local folder holding config.json and "
                                f"{_DIFFUSERS_WEIGHTS}.safetensors (as written by `save_pretrained`); nothing is downloaded.")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, subfolder)):
        path = os.path.join(path, subfolder)  # a pipeline folder
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        raise FileNotFoundError(f"{config!r} is missing: a diffusers model folder has config.json next to its weights.")
    stem = _DIFFUSERS_WEIGHTS + (f".{variant}" if variant else "")
    single, index = os.path.join(path, stem + ".safetensors"), os.path.join(path, stem + ".safetensors.index.json")
    if os.path.exists(single):
        return config, [single]
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index!r} is not a safetensors index (JSON with a 'weight_map'): {type(e).__name__}: {e}") from e
        return config, [os.path.join(path, s) for s in shards]
    bins = [f for f in os.listdir(path) if f.endswith(".bin")]
    hint = (f" Found {bins}: PyTorch .bin weights need torch; re-save them with `save_pretrained(..., "
            f"safe_serialization=True)`." if bins else "")
    raise FileNotFoundError(f"No {stem}.safetensors (or its .index.json) in {path!r}.{hint}")


def dit_from_diffusers(config: Mapping, tensors: Mapping[str, np.ndarray], **overrides) -> DiT:
    """A [`DiT`][] from a diffusers `DiTTransformer2DModel` config dict and its state dict (name -> array)."""
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls != "DiTTransformer2DModel":
        raise ValueError(f"config.json describes a {cls!r}; only 'DiTTransformer2DModel' can be loaded as a DiT.")
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True}
    for field, want in expected.items():
        if config.get(field, want) != want:
            raise ValueError(f"config.json has {field}={config[field]!r}; the DiT architecture needs {want!r}.")
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"config.json has out_channels={out_ch} with in_channels={in_ch}; the DiT outputs either "
                         f"in_channels (eps) or 2 * in_channels (learn_sigma).")
    depth = int(config.get("num_layers", 28))
    hidden = heads * head_dim
    num_classes = int(config.get("num_embeds_ada_norm") or 0)
    kwargs = dict(input_size=int(config.get("sample_size", 32)), patch_size=int(config.get("patch_size", 2)),
                  in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=heads, num_classes=num_classes,
                  class_dropout_prob=0.1, learn_sigma=out_ch == 2 * in_ch, timestep_freq_shift=1.0,
                  mlp_norm_eps=float(config.get("norm_eps", 1e-5)))
    kwargs.update(overrides)

    m = _Mapping(tensors, "diffusers")
    m.add(("x_embedder", "kernel"), "pos_embed.proj.weight", _conv)
    m.add(("x_embedder", "bias"), "pos_embed.proj.bias")
    _with_pos_embed(m, hidden, kwargs["input_size"] // kwargs["patch_size"])
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {("t_embedder", "linear_1"): "timestep_embedder.linear_1",
              ("t_embedder", "linear_2"): "timestep_embedder.linear_2"}
    for ours, theirs in shared.items():
        m.add(ours + ("kernel",), emb.format(0) + theirs + ".weight", _linear)
        m.add(ours + ("bias",), emb.format(0) + theirs + ".bias")
    m.add(("y_embedder", "embedding_table", "embedding"), emb.format(0) + "class_embedder.embedding_table.weight")
    # the per-block copies of the embedders must equal block 0's: the DiT shares one
    pattern = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.*)")
    for key in tensors:
        match = pattern.fullmatch(key)
        if match and match.group(1) != "0":
            ref = emb.format(0) + match.group(2)
            if ref not in tensors or not np.array_equal(np.asarray(tensors[key]), np.asarray(tensors[ref])):
                raise ValueError(f"{key!r} differs from {ref!r}: this diffusers DiT has a separate timestep/label embedder "
                                 f"in each block, but the DiT architecture (and every converted official checkpoint) "
                                 f"shares one. Tie them (copy block 0's norm1.emb to all blocks) before loading.")
            m.used.add(key)
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        _block_entries(m, i, {"adaLN_modulation": p + "norm1.linear", "attn.proj": p + "attn1.to_out.0",
                              "mlp.fc1": p + "ff.net.0.proj", "mlp.fc2": p + "ff.net.2"})
        m.add_fused(("blocks", i, "attn", "qkv", "kernel"), [p + f"attn1.to_{c}.weight" for c in "qkv"], _linear, axis=1)
        m.add_fused(("blocks", i, "attn", "qkv", "bias"), [p + f"attn1.to_{c}.bias" for c in "qkv"], _same, axis=0)
    m.add(("final_layer", "adaLN_modulation", "kernel"), "proj_out_1.weight", _linear)
    m.add(("final_layer", "adaLN_modulation", "bias"), "proj_out_1.bias")
    m.add(("final_layer", "linear", "kernel"), "proj_out_2.weight", _linear)
    m.add(("final_layer", "linear", "bias"), "proj_out_2.bias")
    return m.build(_abstract_dit(**kwargs))


def load_dit_diffusers(path: str | os.PathLike, *, variant: str | None = None, **overrides) -> DiT:
    r"""Load a [`DiT`][] from a local diffusers `DiTTransformer2DModel` folder (or a `DiTPipeline` folder).

    Reads `config.json` and `diffusion_pytorch_model[.variant].safetensors` (single or sharded) with
    `safetensors.numpy`; torch is not needed. bfloat16/float16 weights are cast to the model's
    `param_dtype`. `overrides` are passed on to `DiT` (e.g. `dtype=jnp.bfloat16`, or
    `timestep_freq_shift=0.0` to use the reference code's timestep frequencies).
    """
    config, tensors = _read_diffusers(path, variant, "transformer")
    return dit_from_diffusers(config, tensors, **overrides)


# ------------------------------------------------------------------------------------------------------ official


def dit_from_official(state_dict: Mapping[str, np.ndarray], *, num_heads: int | None = None, **overrides) -> DiT:
    r"""A [`DiT`][] from a facebookresearch/DiT state dict (name -> array).

    The sizes are read from the tensors; the head count is not recoverable from weights, so it is
    taken from the paper's named config with the same depth, width and patch size unless
    `num_heads` is given.
    """
    sd = state_dict
    if "x_embedder.proj.weight" not in sd:
        raise ValueError("Not a DiT state dict: it has no 'x_embedder.proj.weight'. (A training checkpoint is a dict "
                         "with 'model' and 'ema' entries; pass one of those.)")
    hidden, in_ch, patch, _ = np.shape(sd["x_embedder.proj.weight"])
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    out_ch = np.shape(sd["final_layer.linear.weight"])[0] // (patch * patch)
    if "pos_embed" in sd:
        grid = int(round(np.sqrt(np.shape(sd["pos_embed"])[-2])))
    elif "input_size" in overrides:
        grid = overrides["input_size"] // patch
    else:
        raise ValueError("The state dict has no 'pos_embed'; pass `input_size` (the latent side length).")
    if num_heads is None:
        named = [n for n, c in DIT_CONFIGS.items() if (c.depth, c.hidden_size, c.patch_size) == (depth, hidden, patch)]
        if not named:
            raise ValueError(f"Depth {depth}, width {hidden}, patch {patch} is not a named DiT size; pass `num_heads`.")
        num_heads = DIT_CONFIGS[named[0]].num_heads
    has_y = "y_embedder.embedding_table.weight" in sd
    rows = np.shape(sd["y_embedder.embedding_table.weight"])[0] if has_y else 0
    kwargs = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                  num_heads=num_heads, num_classes=max(rows - 1, 0), class_dropout_prob=0.1 if has_y else 0.0,
                  learn_sigma=out_ch == 2 * in_ch, timestep_freq_shift=0.0, mlp_norm_eps=1e-6)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final_layer.linear.weight gives {out_ch} output channels for {in_ch} input channels; "
                         f"expected {in_ch} or {2 * in_ch}.")
    kwargs.update(overrides)

    m = _Mapping(sd, "official DiT")
    m.add(("x_embedder", "kernel"), "x_embedder.proj.weight", _conv)
    m.add(("x_embedder", "bias"), "x_embedder.proj.bias")
    table = _with_pos_embed(m, hidden, kwargs["input_size"] // kwargs["patch_size"])
    if "pos_embed" in sd:  # stored (as a frozen parameter) by the reference code: it must be the same table
        stored = np.asarray(m.get("pos_embed"), np.float32).reshape(-1, hidden)
        if stored.shape != table.shape or not np.allclose(stored, table, atol=1e-4):
            raise ValueError(f"The checkpoint's fixed 'pos_embed' {stored.shape} is not the 2-D sin-cos table for a "
                             f"{kwargs['input_size']}x{kwargs['input_size']} input with patch {kwargs['patch_size']}.")
    for ours, theirs in {"linear_1": "mlp.0", "linear_2": "mlp.2"}.items():
        m.add(("t_embedder", ours, "kernel"), f"t_embedder.{theirs}.weight", _linear)
        m.add(("t_embedder", ours, "bias"), f"t_embedder.{theirs}.bias")
    if has_y:
        m.add(("y_embedder", "embedding_table", "embedding"), "y_embedder.embedding_table.weight")
    for i in range(depth):
        p = f"blocks.{i}."
        _block_entries(m, i, {"adaLN_modulation": p + "adaLN_modulation.1", "attn.qkv": p + "attn.qkv",
                              "attn.proj": p + "attn.proj", "mlp.fc1": p + "mlp.fc1", "mlp.fc2": p + "mlp.fc2"})
    for ours, theirs in {"adaLN_modulation": "adaLN_modulation.1", "linear": "linear"}.items():
        m.add(("final_layer", ours, "kernel"), f"final_layer.{theirs}.weight", _linear)
        m.add(("final_layer", ours, "bias"), f"final_layer.{theirs}.bias")
    return m.build(_abstract_dit(**kwargs))


def load_dit_official(path: str | os.PathLike, *, ema: bool = True, num_heads: int | None = None, **overrides) -> DiT:
    r"""Load a [`DiT`][] from an official facebookresearch/DiT `.pt` file (e.g. `DiT-XL-2-256x256.pt`).

    The file may be a bare state dict (the released weights) or a training checkpoint with
    `"model"` and `"ema"` entries (`ema` picks which). torch is used only to unpickle, with
    `weights_only=True`. Other arguments as in [`dit_from_official`][].
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No DiT checkpoint at {path!r}. Pass a local .pt file (e.g. DiT-XL-2-256x256.pt); "
                                f"nothing is downloaded.")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Reading a .pt checkpoint needs PyTorch to unpickle it: pip install torch (CPU wheel is enough); "
                          "or convert it to a diffusers folder and use load_dit_diffusers.") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} could not be read as a weights-only PyTorch checkpoint: {e}") from e
    if isinstance(obj, Mapping) and "x_embedder.proj.weight" not in obj:
        pick = "ema" if ema else "model"
        if pick in obj:
            obj = obj[pick]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
    sd = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}
    return dit_from_official(sd, num_heads=num_heads, **overrides)


# ---------------------------------------------------------------------------------------------------------- U-Net

_UNET_RENAMES = {"time_linear_1": "time_embedding.linear_1", "time_linear_2": "time_embedding.linear_2",
                 "mid_resnet_1": "mid_block.resnets.0", "mid_resnet_2": "mid_block.resnets.1",
                 "mid_attention": "mid_block.attentions.0", "to_out": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _unet_key(path: tuple) -> str:
    """Our parameter path -> the diffusers `UNet2DModel` state-dict key."""
    parts = []
    for i, p in enumerate(path):
        p = str(p)
        if p == "norm":  # the float32 wrapper around nnx.GroupNorm
            continue
        if p == "resample":
            p = "downsamplers.0.conv" if path[0] == "down_blocks" else "upsamplers.0.conv"
        parts.append(_LEAF[p] if i == len(path) - 1 else _UNET_RENAMES.get(p, p))
    return ".".join(parts)


def unet_from_diffusers(config: Mapping, tensors: Mapping[str, np.ndarray], **overrides):
    """A [`UNet`][] from a diffusers `UNet2DModel` config dict and its state dict (name -> array)."""
    from .unet import UNet

    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"config.json describes a {cls!r}; only 'UNet2DModel' can be loaded as a UNet.")
    expected = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
                "act_fn": "silu", "resnet_time_scale_shift": "default", "downsample_type": "conv", "upsample_type": "conv",
                "downsample_padding": 1, "mid_block_scale_factor": 1, "class_embed_type": None,
                "mid_block_type": "UNetMidBlock2D", "time_embedding_dim": None, "attn_norm_num_groups": None}
    for field, want in expected.items():
        if field in config and config[field] != want:
            raise ValueError(f"config.json has {field}={config[field]!r}; the UNet supports only {want!r}.")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if any(d not in kinds for d in down) or len(up) != len(down):
        raise ValueError(f"down_block_types {down} / up_block_types {up}: supported are DownBlock2D, AttnDownBlock2D and "
                         f"their mirrored UpBlock2D, AttnUpBlock2D.")
    attention = tuple(kinds[d] for d in down)
    mirrored = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirrored:
        raise ValueError(f"up_block_types {up} must mirror down_block_types {down}: expected {mirrored}.")
    kwargs = dict(in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"]),
                  block_channels=tuple(config["block_out_channels"]), layers_per_block=int(config["layers_per_block"]),
                  attention=attention, mid_attention=bool(config.get("add_attention", True)),
                  num_groups=int(config.get("norm_num_groups", 32)), norm_eps=float(config.get("norm_eps", 1e-5)),
                  attention_head_dim=int(config.get("attention_head_dim") or config["block_out_channels"][-1]),
                  dropout=float(config.get("dropout", 0.0)))
    kwargs.update(overrides)
    abstract = nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))
    m = _Mapping(tensors, "diffusers")
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        ndim = len(var.get_value().shape)
        m.add(path, _unet_key(path), _conv if ndim == 4 else _linear if ndim == 2 else _same)
    return m.build(abstract)


def load_unet_diffusers(path: str | os.PathLike, *, variant: str | None = None, **overrides):
    r"""Load a [`UNet`][] from a local diffusers `UNet2DModel` folder (or a pipeline folder with `unet/`).

    Reads `config.json` and the safetensors weights without torch; `overrides` go to `UNet`.
    """
    config, tensors = _read_diffusers(path, variant, "unet")
    return unet_from_diffusers(config, tensors, **overrides)
