"""Pretrained-DiT loaders against the real peer: a small random diffusers DiTTransformer2DModel."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from coupled_diffusion._torch_peers import tie_dit_embedders  # noqa: E402
from coupled_diffusion.models.pretrained import (  # noqa: E402
    dit_from_diffusers,
    dit_from_official,
    load_dit_diffusers,
    load_dit_official,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

HEADS, HEAD_DIM, DEPTH, SIZE, PATCH, CLASSES, C = 2, 16, 3, 8, 2, 10, 4


_tie_embedders = tie_dit_embedders  # diffusers keeps an embedder per block; converted checkpoints hold identical copies


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C,
                                            out_channels=2 * C, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
                                            num_embeds_ada_norm=CLASSES)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight clearly non-trivial
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    _tie_embedders(model)
    model.eval()
    path = tmp_path_factory.mktemp("dit") / "diffusers"
    model.save_pretrained(path)
    return model, path


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 417, 999][:batch])
    y = torch.tensor([3, 0, CLASSES - 1][:batch])
    return x, t, y


def _ours(model, x, t, y):
    out = model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), jnp.asarray(y.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_diffusers_loader_matches_diffusers_forward(peer):
    model, path = peer
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample.numpy()
    ours = load_dit_diffusers(path)
    assert ours.out_channels == 2 * C and len(ours.blocks) == DEPTH
    got = _ours(ours, x, t, y)
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _official_state_dict(model) -> dict:
    """The same weights under the facebookresearch/DiT key names (mapping written from that repo's models.py)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "pos_embed": model.pos_embed.pos_embed.clone()}
    e = "transformer_blocks.0.norm1.emb."
    out |= {"t_embedder.mlp.0.weight": sd[e + "timestep_embedder.linear_1.weight"],
            "t_embedder.mlp.0.bias": sd[e + "timestep_embedder.linear_1.bias"],
            "t_embedder.mlp.2.weight": sd[e + "timestep_embedder.linear_2.weight"],
            "t_embedder.mlp.2.bias": sd[e + "timestep_embedder.linear_2.bias"],
            "y_embedder.embedding_table.weight": sd[e + "class_embedder.embedding_table.weight"]}
    for i in range(DEPTH):
        p, q = f"transformer_blocks.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            out[q + f"attn.qkv.{w}"] = torch.cat([sd[p + f"attn1.to_{c}.{w}"] for c in "qkv"], 0)
            out[q + f"attn.proj.{w}"] = sd[p + f"attn1.to_out.0.{w}"]
            out[q + f"mlp.fc1.{w}"] = sd[p + f"ff.net.0.proj.{w}"]
            out[q + f"mlp.fc2.{w}"] = sd[p + f"ff.net.2.{w}"]
            out[q + f"adaLN_modulation.1.{w}"] = sd[p + f"norm1.linear.{w}"]
    for w in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{w}"] = sd[f"proj_out_1.{w}"]
        out[f"final_layer.linear.{w}"] = sd[f"proj_out_2.{w}"]
    return out


def test_official_loader_matches_reference_convention_forward(peer, tmp_path):
    """The official format gives the reference code's forward: diffusers patched to its two constants is the oracle."""
    model, path = peer
    pt = tmp_path / "dit.pt"
    torch.save(_official_state_dict(model), pt)
    torch.save({"model": {}, "ema": _official_state_dict(model)}, tmp_path / "train.pt")
    ours = load_dit_official(pt, num_heads=HEADS)  # the head count is not in the weights, and this is no named size
    assert ours.blocks[0].attn.num_heads == HEADS

    patched = diffusers.DiTTransformer2DModel.from_pretrained(path)
    patched.eval()
    for block in patched.transformer_blocks:  # the reference code: frequencies 10000^{-k/128}, MLP-norm eps 1e-6
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    x, t, y = _inputs(seed=2)
    with torch.no_grad():
        ref = patched(x, timestep=t, class_labels=y).sample.numpy()
        unpatched = model(x, timestep=t, class_labels=y).sample.numpy()
    assert np.abs(ref - unpatched).max() > 1e-3  # the two conventions really differ
    np.testing.assert_allclose(_ours(ours, x, t, y), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_ours(load_dit_official(tmp_path / "train.pt", num_heads=HEADS), x, t, y), ref, atol=1e-4, rtol=0)


def test_official_loader_needs_heads_for_unnamed_sizes(peer, tmp_path):
    model, _ = peer
    sd = {k: v.numpy() for k, v in _official_state_dict(model).items()}
    with pytest.raises(ValueError, match="num_heads"):
        dit_from_official(sd)
    assert dit_from_official(sd, num_heads=HEADS).blocks[0].attn.num_heads == HEADS


def test_loader_errors(peer, tmp_path):
    model, path = peer
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_dit_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_dit_official(tmp_path / "nowhere.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dit_diffusers(tmp_path / "empty")

    config = json.loads((path / "config.json").read_text())
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    bad = dict(tensors, **{"proj_out_2.weight": tensors["proj_out_2.weight"][:-1]})
    expected = r"'proj_out_2.weight'.*checkpoint shape \(31, 32\).*\(32, 31\) in the Flax layout.*expects \(32, 32\)"
    with pytest.raises(ValueError, match=expected):
        dit_from_diffusers(config, bad)
    with pytest.raises(ValueError, match="extra.weight"):
        dit_from_diffusers(config, dict(tensors, **{"extra.weight": np.zeros(3)}))
    missing = {k: v for k, v in tensors.items() if k != "proj_out_1.bias"}
    with pytest.raises(ValueError, match="proj_out_1.bias"):
        dit_from_diffusers(config, missing)
    untied = dict(tensors)
    key = "transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"
    untied[key] = tensors[key] + 1.0
    with pytest.raises(ValueError, match="embedder in each block"):
        dit_from_diffusers(config, untied)
    with pytest.raises(ValueError, match="norm_type"):
        dit_from_diffusers(dict(config, norm_type="ada_norm"), tensors)
    nan = dict(tensors, **{"proj_out_1.bias": tensors["proj_out_1.bias"].copy()})
    nan["proj_out_1.bias"][3] = np.nan
    with pytest.raises(ValueError, match=r"'proj_out_1.bias'.*holds 1 non-finite values"):
        dit_from_diffusers(config, nan)


def _unet_peer(tmp_path):
    torch.manual_seed(3)
    config = dict(sample_size=28, in_channels=2, out_channels=2, block_out_channels=(16, 32, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    model = diffusers.UNet2DModel(**config)
    with torch.no_grad():  # perturb every weight (diffusers starts biases at zero and norms at one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path)
    return model


def test_unet_loads_diffusers_unet2dmodel_and_matches_its_forward(tmp_path):
    """The Flax U-Net is the same network as diffusers' UNet2DModel (paper-size MNIST layout, 28 -> 14 -> 7)."""
    from coupled_diffusion.models.pretrained import load_unet_diffusers

    peer = _unet_peer(tmp_path)
    ours = load_unet_diffusers(tmp_path)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 2, 28, 28, generator=g), torch.tensor([0, 57, 999])
    with torch.no_grad():
        ref = peer(x, t).sample.numpy()
    forward = nnx.jit(lambda model, x, t: model(x, t))
    got = np.asarray(forward(ours, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy())))
    got = got.transpose(0, 3, 1, 2)
    assert np.abs(ref).max() > 0.05
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert sum(v.size for v in jax.tree.leaves(nnx.state(ours, nnx.Param))) == sum(p.numel() for p in peer.parameters())


def test_unet_loader_rejects_unsupported_configs(tmp_path):
    from coupled_diffusion.models.pretrained import unet_from_diffusers

    config = {"_class_name": "UNet2DModel", "in_channels": 2, "out_channels": 2, "block_out_channels": [16, 32],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}
    with pytest.raises(ValueError, match="must mirror"):
        unet_from_diffusers(config, {})
    with pytest.raises(ValueError, match="time_embedding_type"):
        unet_from_diffusers(dict(config, time_embedding_type="fourier"), {})
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        unet_from_diffusers(dict(config, _class_name="UNet2DConditionModel"), {})


@pytest.mark.parametrize("dot_bias", [False, True])
def test_dit_gradients_match_diffusers_autograd(peer, monkeypatch, dot_bias):
    """The backward pass against PyTorch's: input and parameter gradients of a loaded DiT.

    Covers the head-major q/k/v projections and, with `dot_bias`, the bias gradients summed as a
    matrix-vector product (`_add_bias`, normally used only on large batches).
    """
    from coupled_diffusion.models import dit as dit_module

    monkeypatch.setattr(dit_module, "_DOT_BIAS_MIN_SIZE", 0 if dot_bias else 1 << 62)
    model, path = peer
    x, t, y = _inputs(seed=5)
    cot = torch.randn(3, 2 * C, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    xr = x.clone().requires_grad_()
    model.zero_grad()
    (model(xr, timestep=t, class_labels=y).sample * cot).sum().backward()

    ours = load_dit_diffusers(path)
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def loss(params, xj):
        out = nnx.merge(graphdef, params, rest)(xj, jnp.asarray(t.numpy()), jnp.asarray(y.numpy()))
        return jnp.sum(out * jnp.asarray(cot.numpy().transpose(0, 2, 3, 1)))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    ref_x = xr.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ref_x).max() > 0.1
    np.testing.assert_allclose(np.asarray(gx), ref_x, atol=2e-4 * np.abs(ref_x).max(), rtol=0)
    tb = dict(model.named_parameters())
    for i in range(DEPTH):
        ours_b, theirs = gp["blocks"][i], f"transformer_blocks.{i}."
        pairs = {("mlp", "fc1", "bias"): "ff.net.0.proj.bias", ("mlp", "fc2", "bias"): "ff.net.2.bias",
                 ("attn", "proj", "bias"): "attn1.to_out.0.bias", ("mlp", "fc1", "kernel"): "ff.net.0.proj.weight"}
        for (a, b, c), name in pairs.items():
            ref = tb[theirs + name].grad.numpy()
            ref = ref.T if c == "kernel" else ref
            got = np.asarray(ours_b[a][b][c][...])
            np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0, err_msg=f"block {i} {a}.{b}.{c}")
        qkv = torch.cat([tb[theirs + f"attn1.to_{q}.bias"].grad for q in "qkv"]).numpy()
        np.testing.assert_allclose(np.asarray(ours_b["attn"]["qkv"]["bias"][...]), qkv, atol=2e-4 * np.abs(qkv).max(), rtol=0)


def test_dit_forward_mode_ad_through_the_dot_bias_path(monkeypatch):
    """`jax.jvp` (in the input and every parameter) works through `_add_bias` and equals the plain broadcast add's."""
    from coupled_diffusion import DiT
    from coupled_diffusion.models import dit as dit_module

    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=0,
                rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), 2 * len(leaves))
    params = treedef.unflatten([0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])  # adaLN-Zero starts at 0
    dparams = treedef.unflatten([jax.random.normal(k, v.shape) for k, v in zip(keys[len(leaves):], leaves)])
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    dx = jax.random.normal(jax.random.key(2), x.shape)
    t = jnp.array([1.0, 50.0, 900.0])

    def f(params, x):
        return nnx.merge(graphdef, params, rest)(x, t)

    outs = []
    for size in (0, 1 << 62):
        monkeypatch.setattr(dit_module, "_DOT_BIAS_MIN_SIZE", size)
        outs.append(jax.jvp(f, (params, x), (dparams, dx)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-6)
    scale = float(jnp.abs(outs[1][1]).max())
    assert scale > 0.1
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5 * scale)


def test_damaged_model_files_are_named(peer, tmp_path):
    _, path = peer
    shutil.copytree(path, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text()[:40])  # truncated JSON: json's own error named no file
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON .*damaged or incomplete"):
        load_dit_diffusers(tmp_path / "m")
    shutil.copy(path / "config.json", config)
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # safetensors' error named no file
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors' could not be read as safetensors"):
        load_dit_diffusers(tmp_path / "m")
