"""The PyTorch side of the benchmarks: 2 CPU threads (this machine's cores) or CUDA with TF32 allowed, and a sync."""

import torch

from coupled_diffusion._torch_peers import allow_torchvision_without_its_ops

allow_torchvision_without_its_ops()  # before diffusers is imported (it imports torchvision)
torch.set_num_threads(2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def sync() -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so wall-clock timings cover the work."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
