"""The Flax ResNet-50 against torchvision's on random weights (batch-norm statistics included), and its loader's errors."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import coupled_diffusion as cd  # noqa: E402


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=10)
    with torch.no_grad():  # non-trivial batch-norm statistics and affines, so that folding them is tested
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand_like(buf))
        for name, p in net.named_parameters():
            if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    net.eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_resnet50_matches_torchvision(peer, tmp_path):
    net, path = peer
    ours = cd.load_resnet50(path)
    x = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    xn = cd.imagenet_normalize(jnp.asarray(x))
    with torch.no_grad():
        t = torch.from_numpy(np.array(xn)).permute(0, 3, 1, 2)
        want = net(t).numpy()
        h = net.maxpool(net.relu(net.bn1(net.conv1(t))))
        feats = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(h))))), 1).numpy()
    np.testing.assert_allclose(np.asarray(ours(xn)), want, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(ours.features(xn)), feats, atol=1e-4 * np.abs(feats).max())
    # the same keys as .npz load without torch
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
    np.testing.assert_allclose(np.asarray(cd.load_resnet50(tmp_path / "w.npz")(xn)), np.asarray(ours(xn)), rtol=1e-6, atol=1e-6)


def test_resnet50_loader_errors(peer, tmp_path):
    net, path = peer
    with pytest.raises(FileNotFoundError, match="No ResNet-50 weights at"):
        cd.load_resnet50(tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not be read as a state dict"):
        cd.load_resnet50(broken)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="has no key 'layer4.2.bn3.running_var'"):
        cd.resnet50_from_state_dict({k: v for k, v in state.items() if k != "layer4.2.bn3.running_var"})
    with pytest.raises(ValueError, match=r"Shape mismatch for torchvision resnet50 key 'layer1.0.conv1.weight'"):
        cd.resnet50_from_state_dict(dict(state, **{"layer1.0.conv1.weight": np.zeros((32, 64, 1, 1), np.float32)}))
    with pytest.raises(ValueError, match="checkpoint key\\(s\\) have no place"):
        cd.resnet50_from_state_dict(dict(state, **{"layer5.0.conv1.weight": np.zeros(3, np.float32)}))
