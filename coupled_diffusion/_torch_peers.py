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
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - the operators loaded (e.g. a matching CUDA build)
        return
    except (AttributeError, RuntimeError):
        pass
    global _LIB
    if "_LIB" in globals():
        return
    _LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the definitions live as long as the library object
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
