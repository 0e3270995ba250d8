"""Patch (local, equivariant) empirical scores (issue 19): against an independent NumPy loop over pixels,
the P = L limit against `EmpiricalScore`, translation equivariance, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import E_Q, anisotropic_M, symmetric_M

import coupled_diffusion as cd

OU_SYM, OU_ANI = cd.CoupledOU.symmetric(1.0, 0.4, 2.0), cd.CoupledOU.anisotropic(1.0, 0.8, 2.0)


def numpy_patch_score(M, sw2, t, images, z, patch, equivariant):
    """The score of the module docstring pixel by pixel: E, Q by SciPy; patches by np.roll; a softmax per pixel."""
    E, Q = E_Q(M, sw2, t)
    Qi = np.linalg.inv(Q)
    n, k = images.shape[:2]
    shape = images.shape[2:]
    r = patch // 2
    offsets = [(o,) for o in range(-r, r + 1)] if len(shape) == 1 else [(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1)]

    def patch_at(img, pos):  # (k, P**ndim) of a (k, *shape) image, periodic
        return np.stack([img[(slice(None),) + tuple((p + o) % s for p, o, s in zip(pos, off, shape))] for off in offsets], -1)

    positions = list(np.ndindex(*shape))
    z = z.reshape((z.shape[0], k) + shape)
    out = np.zeros_like(z)
    for b in range(z.shape[0]):
        for pos in positions:
            u = patch_at(z[b], pos)
            sources = positions if equivariant else [pos]
            bank = [(patch_at(images[i], q), images[(i, slice(None)) + q]) for i in range(n) for q in sources]
            logits = []
            for p, _ in bank:
                d = u - E @ p
                logits.append(-0.5 * np.sum(d * (Qi @ d)))
            w = np.exp(np.array(logits) - max(logits))
            w /= w.sum()
            mean = sum(wj * (E @ c) for wj, (_, c) in zip(w, bank, strict=True))
            out[(b, slice(None)) + pos] = Qi @ (mean - z[(b, slice(None)) + pos])
    return out.reshape(out.shape[0], k, -1)


@pytest.mark.parametrize("ndim,side,patch", [(1, 9, 3), (1, 8, 5), (2, 5, 3)])
@pytest.mark.parametrize("equivariant", [True, False])
def test_patch_score_matches_a_numpy_loop_over_pixels(ndim, side, patch, equivariant):
    rng = np.random.default_rng(ndim * 100 + side + patch)
    n, t = 3, 0.6
    images = rng.standard_normal((n, 2) + (side,) * ndim)
    z = rng.standard_normal((2, 2, side**ndim)) * 1.2
    for ou, M in ((OU_SYM, symmetric_M(1.0, 0.4)), (OU_ANI, anisotropic_M(1.0, 0.8))):
        got = cd.PatchScore.of(ou, images, patch, equivariant=equivariant, chunk=7)(t, jnp.asarray(z))
        want = numpy_patch_score(M, 2.0, t, images, z, patch, equivariant)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("ndim,side", [(1, 7), (2, 5)])
def test_full_size_patch_is_the_empirical_score_of_the_images_or_of_all_their_cyclic_shifts(ndim, side):
    rng = np.random.default_rng(ndim)
    images = rng.standard_normal((4, 2) + (side,) * ndim)
    z = jnp.asarray(rng.standard_normal((5, 2, side**ndim)))
    axes = tuple(range(2, 2 + ndim))
    shifts = [np.roll(images, s, axis=axes) for s in np.ndindex(*(side,) * ndim)]
    for t in (0.2, 1.5):
        local = cd.PatchScore.of(OU_ANI, images, side, equivariant=False)(t, z)
        full = cd.EmpiricalScore.of(OU_ANI, images.reshape(4, 2, -1))(t, z)
        np.testing.assert_allclose(np.asarray(local), np.asarray(full), rtol=1e-10, atol=1e-12)
        equi = cd.PatchScore.of(OU_ANI, images, side, equivariant=True)(t, z)
        augmented = cd.EmpiricalScore.of(OU_ANI, np.concatenate(shifts).reshape(-1, 2, side**ndim))(t, z)
        np.testing.assert_allclose(np.asarray(equi), np.asarray(augmented), rtol=1e-10, atol=1e-12)


def test_the_equivariant_score_commutes_with_cyclic_shifts_and_the_position_locked_one_does_not():
    rng = np.random.default_rng(5)
    side = 6
    images = rng.standard_normal((5, 2, side, side))
    z = rng.standard_normal((3, 2, side, side))
    flat = lambda a: jnp.asarray(a.reshape(a.shape[0], 2, -1))  # noqa: E731
    shifted = np.roll(z, (2, -1), axis=(2, 3))
    for equivariant in (True, False):
        patch_score = cd.PatchScore.of(OU_SYM, images, 3, equivariant=equivariant)
        score = jax.jit(lambda t, z, s=patch_score: s(t, z))
        a = np.asarray(score(0.5, flat(shifted))).reshape(3, 2, side, side)
        b = np.roll(np.asarray(score(0.5, flat(z))).reshape(3, 2, side, side), (2, -1), axis=(2, 3))
        if equivariant:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        else:
            assert np.abs(a - b).max() > 1e-2


def test_max_weight_finds_the_copied_image_at_small_times():
    rng = np.random.default_rng(2)
    images = rng.standard_normal((6, 2, 8))
    for equivariant in (True, False):
        score = cd.PatchScore.of(OU_SYM, images, 3, equivariant=equivariant)
        z = images[4][None] * np.exp(-0.6 * 0.01)  # the noiseless path of image 4, near t = 0
        w, img, pos = score.max_weight(0.01, jnp.asarray(z))
        assert np.all(np.asarray(w) > 0.99) and np.all(np.asarray(img) == 4)
        np.testing.assert_array_equal(np.asarray(pos)[0], np.arange(8))


def test_bad_input_names_the_parameter():
    images = np.zeros((3, 2, 7))
    with pytest.raises(ValueError, match=r"`patch` must be an odd integer side in \[1, L = 7\]"):
        cd.PatchScore.of(OU_SYM, images, 9)
    with pytest.raises(ValueError, match=r"`patch` must be an odd integer side"):
        cd.PatchScore.of(OU_SYM, images, 4)
    with pytest.raises(ValueError, match=r"`images` is empty"):
        cd.PatchScore.of(OU_SYM, np.zeros((0, 2, 7)), 3)
    with pytest.raises(ValueError, match=r"k = 2 modalities"):
        cd.PatchScore.of(OU_SYM, np.zeros((3, 1, 7)), 3)
    with pytest.raises(ValueError, match=r"\(n, k, L, L\) \(2-D, square\)"):
        cd.PatchScore.of(OU_SYM, np.zeros((3, 2, 7, 6)), 3)
    with pytest.raises(ValueError, match=r"`chunk` must be a positive integer"):
        cd.PatchScore.of(OU_SYM, images, 3, chunk=0)
    with pytest.raises(ValueError, match=r"`z` must have shape \(\.\.\., 2, 7\)"):
        cd.PatchScore.of(OU_SYM, images, 3)(0.5, jnp.zeros((4, 2, 8)))


def test_the_patch_model_creates_new_images_from_training_patches_where_the_empirical_score_memorises():
    ou = cd.CoupledOU.symmetric(1.0, 0.3, 2.0)
    rng = np.random.default_rng(0)
    side, n = 12, 4
    images = np.sign(rng.standard_normal((n, 2, side)))
    shifted = np.concatenate([np.roll(images, s, -1) for s in range(side)])  # every training image at every shift
    z = jax.random.normal(jax.random.key(0), (64, 2, side))

    def rms_to_nearest(x, bank):
        x, bank = np.asarray(x).reshape(len(x), -1), bank.reshape(len(bank), -1)
        return np.sqrt(((x[:, None] - bank[None]) ** 2).mean(-1).min(1))

    def run(score):
        return cd.reverse_sde(ou, score, z, key=jax.random.key(1), t_start=4.0, t_end=0.01, n_steps=200)

    memorised = run(cd.EmpiricalScore.of(ou, shifted))
    created = run(cd.PatchScore.of(ou, images, 3))
    assert np.median(rms_to_nearest(memorised, shifted)) < 0.35  # the residual noise of t_end only
    assert np.median(rms_to_nearest(created, shifted)) > 0.6     # no training image at any shift
    # ... yet assembled from training patches: each 3-pixel patch of a sample is near one of the training set's
    index = cd.patch_indices(side, 3, 1)
    sample_patches = np.moveaxis(np.asarray(created)[:, :, index], 2, 1).reshape(-1, 2 * 3)
    bank = np.moveaxis(images[:, :, index], 2, 1).reshape(-1, 2 * 3)
    assert np.median(rms_to_nearest(sample_patches, bank)) < 0.35  # one flipped pixel would be 0.82
