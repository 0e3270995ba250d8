import jax

jax.config.update("jax_enable_x64", True)

from coupled_diffusion._torch_peers import allow_torchvision_without_its_ops  # noqa: E402

allow_torchvision_without_its_ops()  # before anything imports diffusers (which imports torchvision)
