"""The installed version of the package, read once from its metadata (written only in `pyproject.toml`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coupled_diffusion")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
