"""Importing the PyTorch peers (tests and benchmarks only; torch is never a runtime dependency).

The torchvision wheels on PyPI are built against the CUDA build of torch. Beside the CPU build
(`torch==2.13.0+cpu`, the `test`/`bench` extras) their C++ operators do not load, and
`import torchvision` then fails while registering fake kernels for two of them (`nms`, `qnms`: it
guards the others), which also breaks `import diffusers`, since diffusers imports torchvision when
it is installed. Declaring those two operator schemas first lets the pure-Python parts of
torchvision (the model definitions the tests compare against) import; the detection operators
themselves stay unusable, and nothing here uses them.
"""


def allow_torchvision_without_its_ops() -> None:
    """Declare `torchvision::nms` and `torchvision::qnms` if torchvision is installed but its operators
    did not load; a no-op otherwise (no torch, no torchvision, or a torchvision whose operators work)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    import glob
    import os

    import torch

    global _LIB
    if "_LIB" in globals():
        return
    # Load torchvision's operator library the way torchvision does: where it matches this torch (a
    # matching CUDA build, say) its own schemas register and nothing must be declared here.
    package = importlib.util.find_spec("torchvision").submodule_search_locations[0]
    for path in glob.glob(os.path.join(package, "_C*.so")) + glob.glob(os.path.join(package, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
            return
        except OSError:
            pass
    _LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the definitions live as long as the library object
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def tie_dit_embedders(model) -> None:
    """Give every block of a diffusers `DiTTransformer2DModel` the first block's timestep/label embedder.

    diffusers keeps one embedder per block where the reference DiT has one for the whole model;
    converted checkpoints hold identical copies, and the loaders (`load_dit_diffusers`) read the
    first. A randomly initialised peer must be tied this way before it is compared with ours."""
    ref = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(ref)
