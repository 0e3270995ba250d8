"""The entry-list small-matrix algebra (`_linalg.Mat`) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coupled_diffusion._linalg import Mat, positive_stable, trace_mm


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_mat_ops_match_numpy(k):
    rng = np.random.default_rng(k)
    A, B = rng.normal(size=(2, 7, k, k)) + 3 * np.eye(k)  # a batch of 7
    X, Y = Mat.of(A), Mat.of(B)
    np.testing.assert_allclose((X @ Y).array(), A @ B, rtol=1e-12)
    np.testing.assert_allclose((X + Y * 2.0 - X / 4.0).array(), A + 2 * B - A / 4, rtol=1e-12)
    np.testing.assert_allclose(X.T.array(), np.swapaxes(A, -1, -2))
    np.testing.assert_allclose(X.inv().array(), np.linalg.inv(A), rtol=1e-10)
    np.testing.assert_allclose(X.det(), np.linalg.det(A), rtol=1e-10)
    np.testing.assert_allclose(X.trace(), np.trace(A, axis1=-2, axis2=-1), rtol=1e-12)
    np.testing.assert_allclose(trace_mm(X, Y), np.trace(A @ B, axis1=-2, axis2=-1), rtol=1e-10)
    sym = X.sym().array()
    np.testing.assert_array_equal(sym, np.swapaxes(sym, -1, -2))
    np.testing.assert_allclose(sym, (A + np.swapaxes(A, -1, -2)) / 2, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_positive_stable_matches_eigenvalues(k):
    rng = np.random.default_rng(10 + k)
    A = rng.normal(size=(400, k, k)) + rng.uniform(-1.5, 1.5, size=(400, 1, 1)) * np.eye(k)
    expect = np.all(np.linalg.eigvals(A).real > 0, axis=-1)
    assert 0 < expect.sum() < len(expect)  # both outcomes are exercised
    np.testing.assert_array_equal(positive_stable(Mat.of(A)), expect)


def test_defective_matrix_is_handled():
    # a Jordan block: eigenvalue 0.5 twice, one eigenvector
    assert bool(positive_stable(Mat.of(jnp.array([[0.5, 0.0], [3.0, 0.5]]))))
    assert not bool(positive_stable(Mat.of(jnp.array([[-0.5, 0.0], [3.0, -0.5]]))))


def test_mat_is_a_pytree_under_jit_vmap_grad():
    A = jnp.arange(1.0, 5.0).reshape(2, 2) + 3 * jnp.eye(2)
    f = jax.jit(jax.vmap(lambda a, c: (Mat.of(a).inv() * c).array()))
    np.testing.assert_allclose(f(jnp.stack([A, 2 * A]), jnp.array([1.0, 3.0]))[1], 1.5 * np.linalg.inv(A), rtol=1e-12)
    g = jax.grad(lambda a: Mat.of(a).det())(A)  # d det / dA = det(A) A^{-T}
    np.testing.assert_allclose(g, np.linalg.det(A) * np.linalg.inv(A).T, rtol=1e-10)
    X = Mat.of(A)
    Y = jax.tree.unflatten(jax.tree.structure(X), jax.tree.leaves(X))
    np.testing.assert_array_equal(Y.array(), A)
