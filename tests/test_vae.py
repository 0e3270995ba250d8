"""The Flax AutoencoderKL decoder against diffusers' on a small random configuration, and its loader's errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import coupled_diffusion as cd  # noqa: E402

CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
              norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**CONFIG).eval()
    with torch.no_grad():  # every weight non-trivial, group-norm affines included
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae") / "diffusers"
    vae.save_pretrained(path)
    return vae, path


def test_decoder_matches_diffusers(peer):
    vae, path = peer
    ours = cd.load_vae_decoder(path)
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(ours(jnp.asarray(z)))
    assert got.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    # decode() takes a diffusion model's latents (scaled by scaling_factor), as DiTPipeline's decode
    np.testing.assert_allclose(np.asarray(ours.decode(jnp.asarray(z) * vae.config.scaling_factor)), got, rtol=1e-5, atol=1e-5)
    # the old attention naming (query / key / value / proj_attn) loads to the same decoder
    from safetensors.numpy import load_file

    tensors = load_file(path / "diffusion_pytorch_model.safetensors")
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in tensors.items()}
    config = json.loads((path / "config.json").read_text())
    np.testing.assert_allclose(np.asarray(cd.vae_decoder_from_diffusers(config, old)(jnp.asarray(z))), got, rtol=1e-6, atol=1e-6)


def test_decoder_loader_errors(peer, tmp_path):
    _, path = peer
    with pytest.raises(FileNotFoundError, match="No diffusers model directory"):
        cd.load_vae_decoder(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes((path / "diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        cd.load_vae_decoder(broken)
    config = json.loads((path / "config.json").read_text())
    from safetensors.numpy import load_file

    tensors = load_file(path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"Shape mismatch for diffusers AutoencoderKL key 'decoder.conv_in\."):
        cd.vae_decoder_from_diffusers(dict(config, block_out_channels=[16, 64]), tensors)
    missing = {k: v for k, v in tensors.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="has no key 'decoder.conv_out.bias'"):
        cd.vae_decoder_from_diffusers(config, missing)
    with pytest.raises(ValueError, match="only 'AutoencoderKL'"):
        cd.vae_decoder_from_diffusers(dict(config, _class_name="UNet2DModel"), tensors)
