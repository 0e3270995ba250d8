"""The CPU extension: 2-D convolutions on XLA:CPU through oneDNN, the library PyTorch's CPU
convolutions use, and two fused kernels of our own for the U-Net's other hot spots.

XLA:CPU's own convolutions run at about two thirds of oneDNN's speed on this project's
machine (forward, input gradient and kernel gradient alike; `benchmarks/README.md`), and the
oneDNN convolution rewriter is not compiled into the PyPI jaxlib. `conv2d` closes that gap
with an XLA FFI custom call (`_onednn_conv.cc`) for each pass of a training step, and a
`custom_vjp` that ties them together:

    forward                 y  = conv(x, w) + b          (bias fused into the convolution)
    backward, data          dx = conv_transpose(dy, w)
    backward, weights       dw, db in one pass over x and dy

XLA:CPU's row reductions are slow (it splits them into reduce-windows), which made the group
norms and the attention softmax about a third of a U-Net forward. The same extension holds two
forward kernels (OpenMP over samples, vectorised for AVX-512, AVX2 or the baseline, chosen at
load time), which `models.unet` wraps with hand-written backward passes in XLA:

    group_norm_ffi          silu(group_norm(x + shift)): statistics and normalisation of each
                            sample while it is in cache (oneDNN 3.2 has no group normalisation)
    attention_ffi           softmax(q k^T / sqrt(D)) v per (sample, head) from the fused q|k|v
                            projection, written heads-merged: no transposes

It is used only where it applies and falls back to `jax.lax.conv_general_dilated` everywhere
else, with the same results up to float rounding:

- the oneDNN packages are installed (`pip install 'coupled_diffusion[onednn]'`: the
  `onednn-cpu-gomp` runtime and the `onednn-devel-cpu-gomp` headers) and a C++17 compiler with OpenMP
  (`$CXX`, `c++`, `g++` or `clang++`) can build the extension. It is built on first use, in
  about 10 s, into `$COUPLED_DIFFUSION_CACHE` (default `~/.cache/coupled_diffusion`), keyed by
  the source, jaxlib and oneDNN, and loaded from there afterwards;
- the call runs on a CPU: the custom calls are registered for XLA:CPU only, and
  `jax.lax.platform_dependent` lowers `lax` convolutions for any other platform, so the same
  code runs unchanged on a GPU or TPU;
- float32 inputs, 2-D, no dilation, no feature groups;
- one CPU device in the process, and operands without an explicit sharding in their type: XLA
  cannot partition a custom call, so with a batch split over several CPU devices
  (`--xla_force_host_platform_device_count`) it would gather the batch onto every device; such
  processes keep XLA's convolutions, which stay split;
- not turned off: `with onednn.enabled(False):` around the code that traces the function
  (scoped to that block and to the thread or task that runs it), `set_enabled(False)` (the
  process-wide default), or `COUPLED_DIFFUSION_ONEDNN=0` in the environment; all are read when
  a function is traced, in that order of precedence.

`status()` says which path is in use and why. Limits of the oneDNN path: reverse-mode only
(`jax.jvp` through it raises, as for any `custom_vjp`; turn it off for forward-mode work), and
under `jax.vmap` the calls run one batch element at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["attention_ffi", "conv2d", "enabled", "group_norm_ffi", "set_enabled", "status", "usable"]

_ENV = "COUPLED_DIFFUSION_ONEDNN"
_SOURCE = pathlib.Path(__file__).with_name("_onednn_conv.cc")
_TARGETS = ("cd_conv2d_fwd", "cd_conv2d_bwd_data", "cd_conv2d_bwd_weights", "cd_group_norm_fwd", "cd_attention_fwd")
_DN = ("NHWC", "HWIO", "NHWC")

_lock = threading.Lock()
_state: dict = {"enabled": None, "loaded": None, "reason": "not built yet (built on first use)", "library": None, "version": None}


_scoped: contextvars.ContextVar[bool | None] = contextvars.ContextVar("coupled_diffusion_onednn", default=None)


@contextlib.contextmanager
def enabled(flag: bool):
    """Use (`True`) or avoid (`False`) the oneDNN path for functions traced inside the block, in
    this thread or task only; the setting before the block comes back after it.

        with onednn.enabled(False):
            y = jax.jit(f)(x)   # traced here: XLA's own convolutions
    """
    token = _scoped.set(bool(flag))
    try:
        yield
    finally:
        _scoped.reset(token)


def set_enabled(enabled: bool | None) -> bool | None:
    """Set the process-wide default: the oneDNN path on (`True`) or off (`False`) for functions traced
    from now on, overriding `COUPLED_DIFFUSION_ONEDNN`; `None` defers to that variable again. Returns
    the previous default. Prefer the scoped [`enabled`][] in library code."""
    previous, _state["enabled"] = _state["enabled"], None if enabled is None else bool(enabled)
    return previous


def _wanted() -> bool:
    if _scoped.get() is not None:
        return _scoped.get()
    if _state["enabled"] is not None:
        return _state["enabled"]
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def status() -> dict:
    """Which convolution path `conv2d` takes on a CPU, and why: a dict with `active`, `reason`, and
    (once built) the extension's `library` path and oneDNN's `version`."""
    if _wanted():
        _load()
    active = bool(_wanted() and _state["loaded"])
    reason = "oneDNN" if active else ("turned off" if not _wanted() else _state["reason"])
    return {"active": active, "reason": reason, "library": _state["library"], "version": _state["version"]}


# -------------------------------------------------------------------------------------------------
# build and load


def _dist_file(dist: str, suffix: str) -> pathlib.Path | None:
    try:
        files = importlib.metadata.distribution(dist).files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if ("/" + str(f).replace("\\", "/")).endswith(suffix):
            return pathlib.Path(f.locate()).resolve()
    return None


def _locate_onednn() -> tuple[pathlib.Path, pathlib.Path]:
    """(include directory, libdnnl path); raises `RuntimeError` saying what is missing."""
    root = os.environ.get("COUPLED_DIFFUSION_ONEDNN_ROOT")
    if root:
        inc, lib = pathlib.Path(root) / "include", pathlib.Path(root) / "lib"
        libs = sorted(lib.glob("libdnnl.so*"))
        if not (inc / "oneapi" / "dnnl" / "dnnl.hpp").is_file() or not libs:
            raise RuntimeError(f"COUPLED_DIFFUSION_ONEDNN_ROOT={root} has no include/oneapi/dnnl/dnnl.hpp or lib/libdnnl.so*")
        return inc, libs[0]
    header = _dist_file("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
    lib = _dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
    if header is None or lib is None:
        raise RuntimeError("oneDNN is not installed: `pip install 'coupled_diffusion[onednn]'` "
                           "(onednn-cpu-gomp and onednn-devel-cpu-gomp) or set COUPLED_DIFFUSION_ONEDNN_ROOT")
    return header.parents[2], lib


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    raise RuntimeError("no C++ compiler found to build the oneDNN extension (set CXX, or install g++)")


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("COUPLED_DIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coupled_diffusion")
    return pathlib.Path(root)


def _build() -> pathlib.Path:
    include, libdnnl = _locate_onednn()
    cxx = _compiler()
    source = _SOURCE.read_bytes()
    flags = ["-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", f"-I{include}", f"-I{jax.ffi.include_dir()}",
             str(libdnnl), f"-Wl,-rpath,{libdnnl.parent}"]
    key = hashlib.sha256(b"\0".join([source, importlib.metadata.version("jaxlib").encode(), str(libdnnl).encode(),
                                     str(libdnnl.stat().st_size).encode(), cxx.encode(), " ".join(flags).encode()]))
    target = _cache_dir() / f"onednn_conv-{key.hexdigest()[:20]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # same directory: the rename below is atomic
    os.close(fd)
    try:
        proc = subprocess.run([cxx, str(_SOURCE), "-o", tmp, *flags], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building the oneDNN extension failed ({cxx}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _load() -> bool:
    """Build (once, cached on disk), load and register the FFI targets; False with a reason if it can't."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            path = _build()
            lib = ctypes.CDLL(str(path))
            for name in _TARGETS:
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
            v = [ctypes.c_int() for _ in range(3)]
            lib.cd_onednn_version(*(ctypes.byref(i) for i in v))
            _state.update(loaded=True, reason="oneDNN", library=str(path), version=".".join(str(i.value) for i in v))
        except (RuntimeError, OSError, AttributeError) as e:
            _state.update(loaded=False, reason=str(e))
        return _state["loaded"]


# -------------------------------------------------------------------------------------------------
# the convolution


def _normalize(strides, padding, in_hw, kernel_hw):
    strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"`strides` must be a positive int or a pair of them; got {strides}.")
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"`padding` must be 'SAME', 'VALID' or ((top, bottom), (left, right)); got {padding!r}.")
        padding = jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper())
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if len(padding) != 2 or any(len(p) != 2 or min(p) < 0 for p in padding):
        raise ValueError(f"`padding` must be ((top, bottom), (left, right)) of non-negative ints; got {padding}.")
    return strides, padding


def _attrs(strides, padding):
    (pt, pb), (pl, pr) = padding
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(pt), pad_bottom=np.int64(pb),
                pad_left=np.int64(pl), pad_right=np.int64(pr))


def _lax_conv(x, kernel, bias, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN) + bias


def _out_shape(x, kernel, strides, padding):
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    ho = (h + sum(padding[0]) - kh) // strides[0] + 1
    wo = (w + sum(padding[1]) - kw) // strides[1] + 1
    return (n, ho, wo, o)


def _ffi_forward(x, kernel, bias, strides, padding):
    out = jax.ShapeDtypeStruct(_out_shape(x, kernel, strides, padding), x.dtype)
    return jax.ffi.ffi_call("cd_conv2d_fwd", out, vmap_method="sequential")(x, kernel, bias, **_attrs(strides, padding))


def _ffi_backward(x, kernel, dy, strides, padding):
    a = _attrs(strides, padding)
    dx = jax.ffi.ffi_call("cd_conv2d_bwd_data", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(dy, kernel, **a)
    dw, db = jax.ffi.ffi_call("cd_conv2d_bwd_weights", (jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
                                                         jax.ShapeDtypeStruct(kernel.shape[-1:], kernel.dtype)),
                              vmap_method="sequential")(x, dy, **a)
    return dx, dw, db


def _lax_backward(x, kernel, dy, strides, padding):
    _, vjp = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN), x, kernel)
    dx, dw = vjp(dy)
    return dx, dw, dy.sum((0, 1, 2))


def _single_cpu_device() -> bool:
    """One CPU device, the usual case. With several (`--xla_force_host_platform_device_count`), a
    batch split over them must stay split: XLA would gather the batch around a custom call, which it
    cannot partition, so such processes keep XLA's convolutions."""
    return len(jax.devices("cpu")) == 1


def _explicitly_sharded(*arrays) -> bool:
    """Operands whose type carries a sharding (`jax.sharding.AxisType.Explicit` meshes) keep XLA's convolutions."""
    for a in arrays:
        spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", ())
        if any(p is not None for p in spec):
            return True
    return False


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _onednn_conv(x, kernel, bias, strides, padding):
    return _onednn_conv_fwd(x, kernel, bias, strides, padding)[0]


def _onednn_conv_fwd(x, kernel, bias, strides, padding):
    y = jax.lax.platform_dependent(x, kernel, bias, cpu=functools.partial(_ffi_forward, strides=strides, padding=padding),
                                   default=functools.partial(_lax_conv, strides=strides, padding=padding))
    return y, (x, kernel)


def _onednn_conv_bwd(strides, padding, res, dy):
    x, kernel = res
    return jax.lax.platform_dependent(x, kernel, dy, cpu=functools.partial(_ffi_backward, strides=strides, padding=padding),
                                      default=functools.partial(_lax_backward, strides=strides, padding=padding))


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def conv2d(x, kernel, bias=None, strides=1, padding="SAME"):
    r"""`y = conv(x, kernel) + bias`: a 2-D cross-correlation, channels last.

    **Arguments:**

    - `x`: (N, H, W, C) activations.
    - `kernel`: (KH, KW, C, O), HWIO as in `nnx.Conv` and `lax.conv_general_dilated`.
    - `bias`: (O,) or `None`.
    - `strides`: an int or (SH, SW).
    - `padding`: `'SAME'`, `'VALID'` (as in `lax.conv_general_dilated`), or ((top, bottom), (left, right)).

    **Returns:** (N, HO, WO, O) with HO = (H + top + bottom - KH) // SH + 1 (and WO alike), in the
    result dtype of `x` and `kernel`.

    On XLA:CPU with float32 operands it runs through oneDNN (see the module docstring and
    `status()`); otherwise, and on every other platform, it is `lax.conv_general_dilated`.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"`x` must be (N, H, W, C) and `kernel` (KH, KW, C, O); got shapes {x.shape} and {kernel.shape}.")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(f"`kernel` has {kernel.shape[2]} input channels but `x` has {x.shape[3]} (x {x.shape}, kernel {kernel.shape}).")
    bias = jnp.zeros(kernel.shape[-1], jnp.result_type(x, kernel)) if bias is None else jnp.asarray(bias)
    if bias.shape != kernel.shape[-1:]:
        raise ValueError(f"`bias` must have shape ({kernel.shape[-1]},), one per output channel; got {bias.shape}.")
    strides, padding = _normalize(strides, padding, x.shape[1:3], kernel.shape[:2])
    if min(_out_shape(x, kernel, strides, padding)[1:3]) < 1:
        raise ValueError(f"the kernel {kernel.shape[:2]} does not fit the padded input {x.shape[1:3]} with padding {padding}.")
    if usable(x, kernel, bias):
        return _onednn_conv(x, kernel, bias, strides, padding)
    return _lax_conv(x, kernel, bias.astype(jnp.result_type(x, kernel)), strides, padding)


def usable(*arrays) -> bool:
    """Whether a function traced now would run these float32 operands through the extension (see the
    module docstring): float32, one CPU device, no explicit sharding, not turned off, built."""
    return (all(a.dtype == jnp.float32 for a in arrays) and _single_cpu_device() and not _explicitly_sharded(*arrays)
            and _wanted() and _load())


def group_norm_ffi(x, scale, bias, shift, groups: int, eps: float, silu: bool):
    """The extension's fused group norm on XLA:CPU: `x` (N, P, C) plus `shift` (N, C) per sample and
    channel, normalised over each of `groups` channel groups, times `scale` plus `bias` (C,), then
    SiLU if `silu`. Returns y (N, P, C), and the mean and 1/std (N, groups) of `x + shift`.

    Only for operands [`usable`][] accepts, on a CPU (callers wrap it in
    `jax.lax.platform_dependent`); no differentiation rule of its own."""
    n, _, c = x.shape
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n, groups), x.dtype),
           jax.ShapeDtypeStruct((n, groups), x.dtype))
    return jax.ffi.ffi_call("cd_group_norm_fwd", out, vmap_method="sequential")(
        x, scale, bias, shift, eps=np.float32(eps), silu=np.int64(bool(silu)))


def attention_ffi(qkv, heads: int):
    """The extension's multi-head softmax attention on XLA:CPU: `qkv` (N, P, 3C) holds q | k | v, each
    C = heads x D wide (head h in channels h D ... (h + 1) D - 1); returns out (N, P, C), as
    `jax.nn.dot_product_attention` with scale 1/sqrt(D) computes it with the heads merged, and the
    log-sum-exp (N, heads, P) of each row of scaled logits.

    Only for operands [`usable`][] accepts, on a CPU; no differentiation rule of its own."""
    n, p, c3 = qkv.shape
    out = (jax.ShapeDtypeStruct((n, p, c3 // 3), qkv.dtype), jax.ShapeDtypeStruct((n, heads, p), qkv.dtype))
    return jax.ffi.ffi_call("cd_attention_fwd", out, vmap_method="sequential")(qkv, heads=np.int64(heads))
