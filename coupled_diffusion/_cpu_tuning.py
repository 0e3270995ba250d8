"""Host-side tuning for XLA:CPU, opt in: `tune_cpu()` (the CLI and the benchmarks call it).

Importing `coupled_diffusion` changes nothing in the host process. Two settings make this
library's convolutional training steps about 1.5x faster on a CPU (`benchmarks/README.md`,
"CPU tuning"), and both change the whole process, so they are applied only on request, by
`tune_cpu()` before JAX starts its CPU backend (or by `COUPLED_DIFFUSION_CPU_TUNING=1` in the
environment, which applies them at import):

1. **glibc's allocator keeps freed memory.** XLA:CPU allocates each execution's temporary
   buffer (about 0.9 GB for the paper's U-Net training step at batch 128) from a worker
   thread. glibc serves such sizes from a fresh `mmap` in a worker's arena and unmaps them on
   `free`, so every step touches ~1 GB of new pages: about 240k page faults per step. With a
   single arena, no `mmap` for large blocks and no trimming of the heap's top, the pages are
   reused (0 faults per step once warm). The price is that the process keeps its peak heap,
   which is also why a library should not do this to a process that only imported it.
2. **XLA:CPU hands dots and their fusions to YNNPACK** (`--xla_cpu_experimental_ynn_fusion_type=dot`).
   jaxlib 0.10's default routes convolutions to YNNPACK, which runs them on one thread here;
   with `dot`, convolutions stay on XLA's multi-threaded Eigen kernels and matmuls go to
   YNNPACK. Only set for the jaxlib versions it was measured on, since XLA aborts on unknown
   flags. `tune_cpu(xla_flags=False)` leaves it out: it slows transformer inference and makes
   XLA compute bfloat16 dots in float32 (off the AMX tiles of newer Xeons).

Neither is applied when `COUPLED_DIFFUSION_CPU_TUNING=0` (which overrides `tune_cpu()` too),
when JAX will run on an accelerator (an accelerator plugin is installed and `JAX_PLATFORMS`
does not pin `cpu`), or, for the XLA flag, when the backend has already started or
`XLA_FLAGS` already chooses a YNN fusion type. `cpu_tuning()` reports what was applied and why not.
"""

import ctypes
import importlib.util
import os
import platform

__all__ = ["cpu_tuning", "tune_cpu"]

_ENV = "COUPLED_DIFFUSION_CPU_TUNING"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
_YNN_VERSIONS = ((0, 10, 2), (0, 11, 0))  # [first, last): the jaxlib releases the flag was measured on
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>

_REPORT: dict[str, str] = {}


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this private module
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def _tune_allocator() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "skipped: not Linux with glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim (mallopt(3))
    except (OSError, AttributeError) as err:  # pragma: no cover - an unusual libc
        return f"skipped: mallopt unavailable ({err})"
    return "applied: one arena, no mmap for large blocks, no trimming" if ok else "failed: mallopt refused"


def _tune_xla_flags() -> str:
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return "skipped: XLA_FLAGS already sets a YNN fusion type"
    if _backend_started():
        return "skipped: the JAX backend had already started"
    try:
        from jax._src.lib import version as jaxlib_version  # the installed jaxlib as a tuple of ints, as JAX gates on it
    except ImportError:  # pragma: no cover - a JAX without this private module
        return "skipped: jaxlib version unknown"
    first, last = _YNN_VERSIONS
    if not first <= tuple(jaxlib_version) < last:
        return f"skipped: jaxlib {'.'.join(map(str, jaxlib_version))} is outside the measured range"
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return f"applied: {YNN_FLAG}"


def tune_cpu(*, xla_flags: bool = True) -> dict[str, str]:
    """Apply the CPU tuning of the module docstring to this process, once; call it before any JAX
    computation (the XLA flag is skipped once JAX's backend has started).

    **Arguments:**

    - `xla_flags`: False keeps XLA:CPU's own routing of dots (the allocator settings still apply).
      The YNN flag speeds up training steps but slows transformer inference and every bfloat16
      product: with it XLA:CPU computes bfloat16 dots in float32 instead of on the AMX tiles
      (measured in `benchmarks/README.md`, dit_replica.py; the replica benchmark passes False).

    **Returns:** what was done, as [`cpu_tuning`][] reports it.
    """
    if not _REPORT:
        if os.environ.get(_ENV, "").strip() == "0":
            _REPORT.update(allocator=f"skipped: {_ENV}=0", xla_flags=f"skipped: {_ENV}=0")
        elif _accelerator_expected():
            reason = "skipped: JAX is expected to run on an accelerator"
            _REPORT.update(allocator=reason, xla_flags=reason)
        else:
            _REPORT.update(allocator=_tune_allocator(),
                           xla_flags=_tune_xla_flags() if xla_flags else "skipped: tune_cpu(xla_flags=False)")
    return cpu_tuning()


def tune_at_import() -> None:
    """What `import coupled_diffusion` does: `tune_cpu()` only when `COUPLED_DIFFUSION_CPU_TUNING=1`."""
    if os.environ.get(_ENV, "").strip() == "1":
        tune_cpu()


def cpu_tuning() -> dict[str, str]:
    """What the CPU tuning did: `{"allocator": ..., "xla_flags": ...}`, each starting with `applied`,
    `skipped`, `failed` or `not requested` and saying why.

    Opt in with [`tune_cpu`][] (or `COUPLED_DIFFUSION_CPU_TUNING=1` before the import); opt out of
    every opt-in with `COUPLED_DIFFUSION_CPU_TUNING=0`. See the module docstring for what is tuned
    and the measured effect.
    """
    if not _REPORT:
        reason = "not requested: call coupled_diffusion.tune_cpu() (or set COUPLED_DIFFUSION_CPU_TUNING=1)"
        return dict(allocator=reason, xla_flags=reason)
    return dict(_REPORT)
