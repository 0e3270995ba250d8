"""The package's layering (README, "Layout"): no module imports from a higher layer.

Two independent checks. The static one reads every module's source, lazy imports inside
functions included. The dynamic one imports the layers' modules in a fresh interpreter,
lowest layer first (without the package's `__init__.py`, which re-exports everything), and
after each layer looks at what got loaded.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import coupled_diffusion

ROOT = pathlib.Path(coupled_diffusion.__file__).parent

# the layers, lowest first: a module may import from its own layer and the ones before it
LAYERS = [
    # 0. foundations: they import nothing of the package
    ["_types", "_results", "_checks", "_linalg", "_checkpoint", "_runlock", "_version", "_cpu_tuning", "_torch_peers", "plotting"],
    ["theory", "schedules"],  # 1. closed-form theory of coupled OU processes; coupling schedules g(t)
    ["sampling"],  # 2. exact-score simulation
    ["models"],  # 3. neural score models
    ["data", "diffusion"],  # 4. data, discrete VP diffusion and training
    ["optimize", "sweep"],  # 5. schedule optimisation, parameter sweeps
    ["experiments"],  # 6. the papers' experiments
    ["cli", "__init__"],  # 7. the command and the public API
]


def _layer(module: str) -> int:
    """The layer of `coupled_diffusion.<module>` (a dotted path inside the package)."""
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"coupled_diffusion.{module} is in no layer; add it to LAYERS (and to the README's Layout).")


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by its dotted path inside it (`theory.moments`, `__init__`)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The package modules that `module` imports anywhere in its source, as dotted paths inside the package."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "coupled_diffusion":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import _cpu_tuning` names a module; `from .x import f` names x
                candidate = ".".join(base + [alias.name])
                found.add(candidate if (ROOT / pathlib.Path(*candidate.split("."))).with_suffix(".py").exists()
                          or (ROOT / pathlib.Path(*candidate.split("."))).is_dir() else ".".join(base))
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "coupled_diffusion"}
    return {m for m in found if m}


def test_every_module_is_in_a_layer():
    assert {m: _layer(m) for m in _modules()}  # raises, naming the module, if one is missing


def test_no_module_imports_from_a_higher_layer_in_its_source():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, path in _modules().items() for t in sorted(_imports(m, path)) if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_the_static_check_sees_lazy_and_relative_imports(tmp_path):
    # the check itself must be able to fail: lazy imports inside a function are found, resolved
    # from the module's place in the package
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..experiments.mnist import sample_grid\n    from .. import plotting\n"
                     "    from .noise import add_noise\n    import coupled_diffusion.cli\n")
    found = _imports("diffusion.probe", probe)
    assert found == {"experiments.mnist", "plotting", "diffusion.noise", "cli"}
    assert max(_layer(m) for m in found) > _layer("diffusion.probe")


_LOADED = """
import importlib, json, sys, types
package = types.ModuleType("coupled_diffusion")  # the package without its __init__ (which re-exports everything)
package.__path__ = [{root!r}]
sys.modules["coupled_diffusion"] = package
loaded = []
for names in {layers!r}:  # lowest layer first: what a layer's import adds must come from it or below
    for name in names:
        importlib.import_module("coupled_diffusion." + name)
    loaded.append(sorted(m[len("coupled_diffusion."):] for m in sys.modules if m.startswith("coupled_diffusion.")))
print(json.dumps(loaded))
"""


def test_importing_each_layer_loads_nothing_from_a_higher_one():
    layers = [[m for m in _modules() if _layer(m) == i] for i in range(len(LAYERS) - 1)]  # the top layer imports everything
    code = textwrap.dedent(_LOADED.format(root=str(ROOT), layers=layers))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    for layer, (names, loaded) in enumerate(zip(layers, json.loads(out.stdout.strip().splitlines()[-1]), strict=True)):
        assert set(names) <= set(loaded)
        higher = sorted(m for m in loaded if _layer(m) > layer)
        assert not higher, f"importing layer {layer} ({names}) loaded {higher}"
