"""k > 2 modalities: coupling graphs and their stability bounds, per-eigenmode speciation and collapse times
against an independent SciPy computation (eigh + expm + brentq) for k = 3 and 5, degenerate eigenspaces,
non-symmetric M, and the vmapped sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import coupled_diffusion as cd


@pytest.mark.parametrize("graph", cd.GRAPHS)
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_graph_spectra_and_stability_bounds_match_numpy(graph, k):
    if graph == "ring" and k < 3:
        pytest.skip("a ring needs k >= 3")
    A = cd.adjacency(graph, k)
    assert np.array_equal(A, A.T) and np.all(np.diag(A) == 0) and A.sum() == {"all_to_all": k * (k - 1), "ring": 2 * k,
                                                                              "chain": 2 * (k - 1), "star": 2 * (k - 1)}[graph]
    np.testing.assert_allclose(cd.adjacency_eigenvalues(graph, k), np.linalg.eigvalsh(A)[::-1], atol=1e-12)
    beta = 1.3
    lo, hi = (float(v) for v in cd.stability_interval(graph, k, beta))
    for g, stable in ((hi * (1 - 1e-6), True), (hi * (1 + 1e-6), False), (lo * (1 - 1e-6), True), (lo * (1 + 1e-6), False)):
        top = np.linalg.eigvalsh(-beta * np.eye(k) + g * A)[-1]
        assert (top < 0) == stable
        if stable:
            np.testing.assert_allclose(np.asarray(cd.CoupledOU.graph(graph, k, beta, g, 2.0).M), -beta * np.eye(k) + g * A, atol=1e-12)
        else:
            with pytest.raises(ValueError, match="outside the stable range"):
                cd.CoupledOU.graph(graph, k, beta, g, 2.0)


def test_two_modalities_are_eq2():
    for graph in ("all_to_all", "chain", "star"):
        np.testing.assert_allclose(np.asarray(cd.coupling_matrix(graph, 2, 1.0, 0.4)), np.asarray(cd.CoupledOU.symmetric(1.0, 0.4, 2.0).M))
    data = cd.TwoClassMixture.from_angle(3.0, 2.0, 0.6, variances=(1.0, 1.0))
    h = cd.mode_hierarchy(cd.CoupledOU.graph("all_to_all", 2, 1.0, 0.4, 2.0), data, alpha=0.4)
    paper = cd.mode_speciation_times(cd.CoupledOU.symmetric(1.0, 0.4, 2.0), data, throw=False)
    np.testing.assert_allclose(np.asarray(h.speciation.value), [float(s.value) for s in paper], rtol=1e-12)


def equicorrelated(k, m2, rho):
    return m2 * ((1 - rho) * np.eye(k) + rho * np.ones((k, k)))


@pytest.mark.parametrize("case", ["ring3", "chain5"])
def test_mode_times_match_scipy_eigh_expm_brentq(case):
    rng = np.random.default_rng(5)
    if case == "ring3":  # a degenerate pair, isotropic data inside it
        k, graph, g, gram = 3, "ring", 0.3, equicorrelated(3, 2.0, 0.4)
    else:  # distinct modes, a random Gram matrix
        k, graph, g = 5, "chain", -0.35
        B = rng.normal(size=(k, 3))
        gram = B @ B.T
    ou = cd.CoupledOU.graph(graph, k, 1.0, g, 2.0)
    data = cd.TwoClassMixture(gram, np.full(k, 0.8))
    for dim in (None, 16):
        h = cd.mode_hierarchy(ou, data, dim=dim, alpha=0.3)
        M = np.asarray(ou.M)
        lam, V = np.linalg.eigh(M)
        lam, V = lam[::-1], V[:, ::-1]
        np.testing.assert_allclose(np.asarray(h.eigenvalues), lam, atol=1e-12)
        want = ref.mode_speciation_times(M, 2.0, gram, 0.8, V, scale=1.0 if dim is None else dim)
        got = np.asarray(h.speciation.value)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isfinite(want).sum() >= 2
        np.testing.assert_allclose(got, want, rtol=1e-9)
        # the per-mode kappas add up to the joint kappa, so the first commitment precedes the joint speciation time
        ts = float(cd.speciation_time(ou, data, dim=dim).value)
        assert np.nanmax(got) <= ts + 1e-9
        joint = ref.kappa(M, 2.0, gram, np.full(k, 0.8), 0.7)
        np.testing.assert_allclose(ref.mode_kappas(M, 2.0, gram, 0.8, 0.7, V).sum(), joint, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(h.collapse.value), ref.mode_collapse_times(M, 2.0, 0.8, V, 0.3), rtol=1e-9)
    order = np.argsort(-np.where(np.isnan(got), -np.inf, got), kind="stable")
    np.testing.assert_array_equal(np.asarray(h.order), order)
    fin = got[order][: np.isfinite(got).sum()]
    assert float(h.spread) == pytest.approx(fin[0] - fin[-1], rel=1e-12)
    np.testing.assert_allclose(np.asarray(h.gaps)[: len(fin) - 1], -np.diff(fin), rtol=1e-9, atol=1e-12)


def test_degenerate_eigenspace_uses_the_principal_axes_of_the_projected_gram():
    rng = np.random.default_rng(7)
    k = 4
    B = rng.normal(size=(k, k))
    gram = B @ B.T  # anisotropic inside the (k - 1)-fold degenerate space of the all-to-all M
    ou = cd.CoupledOU.graph("all_to_all", k, 1.0, 0.2, 2.0)
    data = cd.TwoClassMixture(gram, np.ones(k))
    h = cd.mode_hierarchy(ou, data)
    u = np.ones(k) / np.sqrt(k)
    P = np.linalg.svd(np.eye(k) - np.outer(u, u))[0][:, : k - 1]  # a basis of the degenerate space
    mu, W = np.linalg.eigh(P.T @ gram @ P)
    V = np.column_stack([u, P @ W])
    want_m2 = np.concatenate([[u @ gram @ u], mu])
    np.testing.assert_allclose(np.sort(np.asarray(h.m2)[1:]), np.sort(want_m2[1:]), rtol=1e-9)
    assert float(h.m2[0]) == pytest.approx(want_m2[0], rel=1e-12)
    V_got = np.asarray(h.eigenvectors)
    Bd = (V_got.T @ gram @ V_got)[1:, 1:]  # inside the degenerate space the modes' mean vectors are orthogonal
    np.testing.assert_allclose(Bd - np.diag(np.diag(Bd)), 0, atol=1e-9)
    want = ref.mode_speciation_times(np.asarray(ou.M), 2.0, gram, 1.0, V)
    np.testing.assert_allclose(np.sort(np.nan_to_num(np.asarray(h.speciation.value), nan=-1)), np.sort(np.nan_to_num(want, nan=-1)),
                               rtol=1e-9)


def test_non_symmetric_M_says_only_joint_quantities_exist():
    data3 = cd.TwoClassMixture(np.eye(3), np.ones(3))
    cases = {"defective": [[-1.0, 0.5, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -2.0]],
             "not symmetric": [[-1.0, 0.5, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, -3.0]],
             "complex eigenvalues": [[-1.0, 0.5, 0.0], [-0.5, -1.0, 0.0], [0.0, 0.0, -2.0]]}
    for match, M in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            cd.mode_hierarchy(cd.CoupledOU(M, 2.0), data3)
        assert "speciation_time" in str(e.value)
    with pytest.raises(ValueError, match="defective"):
        cd.mode_hierarchy(cd.CoupledOU.anisotropic(1.0, 0.5, 2.0), cd.TwoClassMixture.from_angle(1.0, 1.0, 0.3))
    # under jit a non-symmetric M is a result code, not a number
    bad = jax.jit(lambda M: cd.mode_hierarchy(cd.CoupledOU(M, 2.0), data3).speciation)(jnp.asarray(cases["not symmetric"]))
    assert not np.any(np.asarray(bad.found)) and np.all(np.isnan(np.asarray(bad.value)))
    assert np.all(np.asarray(bad.result == cd.RESULTS.not_mode_decomposable))


def test_hierarchy_vmaps_over_couplings_and_matches_the_loop():
    data = cd.TwoClassMixture(equicorrelated(6, 2.0, 0.5), np.ones(6))
    lo, hi = (float(v) for v in cd.stability_interval("chain", 6, 1.0))
    gs = np.linspace(0.9 * lo, 0.9 * hi, 7)
    f = jax.jit(jax.vmap(lambda g: cd.mode_hierarchy(cd.CoupledOU(cd.coupling_matrix("chain", 6, 1.0, g), 2.0), data).speciation.value))
    batch = np.asarray(f(jnp.asarray(gs)))
    for g, row in zip(gs, batch):
        one = np.asarray(cd.mode_hierarchy(cd.CoupledOU.graph("chain", 6, 1.0, g, 2.0), data).speciation.value)
        np.testing.assert_allclose(row, one, rtol=1e-10, equal_nan=True)
    # and the times are differentiable in g (closed forms)
    d = jax.grad(lambda g: cd.mode_hierarchy(cd.CoupledOU(cd.coupling_matrix("chain", 6, 1.0, g), 2.0), data).speciation.value[0])(0.2)
    eps = 1e-6
    fd = (f(jnp.asarray([0.2 + eps]))[0, 0] - f(jnp.asarray([0.2 - eps]))[0, 0]) / (2 * eps)
    assert float(d) == pytest.approx(float(fd), rel=1e-5)


def test_exact_score_cloning_per_eigenmode_follows_the_mode_theory_k4():
    """k = 4 ring: class means along one eigenmode at a time (the slowest, lambda = -0.3, and the fastest,
    lambda = -1.7); the exact-score clone agreement follows that mode's own theoretical curve within Monte Carlo
    error, and the two modes' curves differ by far more than that error."""
    ou = cd.CoupledOU.graph("ring", 4, 1.0, 0.35, 2.0)
    lam, V = np.linalg.eigh(np.asarray(ou.M))
    lam, V = lam[::-1], V[:, ::-1]
    d, n_pairs, tb = 16, 600, np.array([0.5, 1.2, 2.5, 4.0])
    curves = {}
    for i in (0, 3):
        data = cd.TwoClassMixture(1.5 * np.outer(V[:, i], V[:, i]), np.ones(4))
        c = cd.clone_agreement(ou, data, tb, dim=d, n_pairs=n_pairs, n_steps=250, t_max=8.0, key=jax.random.key(i),
                               increments="rademacher")
        theory = np.asarray(cd.mode_clone_agreement_theory(ou, data, c.t_branch, dim=d))
        assert np.allclose(theory[:, [j for j in range(4) if j != i]], 0.5, atol=1e-12)  # the other modes carry nothing
        phi = theory[:, i]
        np.testing.assert_allclose(phi, np.asarray(cd.clone_agreement_theory(ou, data, c.t_branch, dim=d)), atol=1e-12)
        se = np.sqrt(np.maximum(phi * (1 - phi), 1e-3) / n_pairs)
        assert np.all(np.abs(np.asarray(c.agreement) - phi) < 4 * se + 0.01), (i, np.asarray(c.agreement), phi)
        curves[i] = phi
    # the slow mode commits earlier in the reverse process (larger t): its agreement is higher at every branch time
    assert np.all(curves[0] >= curves[3]) and np.max(curves[0] - curves[3]) > 0.25


def test_sweep_matches_single_calls_and_the_cli_writes_its_files(tmp_path):
    from coupled_diffusion.cli import main
    from coupled_diffusion.experiments.modalities import ModalitiesSweep, modalities_sweep

    cfg = ModalitiesSweep(k_max=5, n_g=5)
    out = modalities_sweep(cfg)
    assert set(out["results"]["ring"]) == {3, 4, 5} and set(out["results"]["star"]) == {2, 3, 4, 5}
    r = out["results"]["star"][4]
    np.testing.assert_allclose(r["fraction"], [-0.95, -0.475, 0.0, 0.475, 0.95])
    lo, hi = r["g_interval"]
    assert hi == pytest.approx(1 / np.sqrt(3)) and lo == pytest.approx(-1 / np.sqrt(3))
    data = cd.TwoClassMixture(cfg.gram(4), np.ones(4))
    for j, g in enumerate(r["g"]):
        h = cd.mode_hierarchy(cd.CoupledOU.graph("star", 4, 1.0, g, 2.0), data, alpha=cfg.alpha)
        np.testing.assert_allclose(r["t_speciation"][j], np.asarray(h.speciation.value), rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(r["t_collapse"][j], np.asarray(h.collapse.value), rtol=1e-10)
        assert r["spread"][j] == pytest.approx(float(h.spread), rel=1e-10, nan_ok=True)
    with pytest.raises(ValueError, match="rho"):
        ModalitiesSweep(rho=-0.5).validate()
    with pytest.raises(ValueError, match="graphs"):
        ModalitiesSweep(graphs=("tree",)).validate()
    assert main(["modalities", "--out", str(tmp_path), "--k-max", "4", "--n-g", "3", "--graphs", "ring,chain"]) == 0
    d = __import__("json").loads((tmp_path / "modalities.json").read_text())
    assert set(d["results"]) == {"ring", "chain"} and (tmp_path / "spread.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["modalities", "--out", str(tmp_path), "--graphs", "tree"]) == 2


@pytest.mark.parametrize("case", ["ring5", "all_to_all4_anisotropic"])
def test_gradients_stay_exact_inside_degenerate_eigenspaces(case):
    """eigh's eigenvector derivative divides by rounding-level differences inside a degenerate eigenspace; the
    per-mode times' gradients must still match central differences (forward and reverse mode)."""
    if case == "ring5":
        graph, k, gram = "ring", 5, equicorrelated(5, 2.0, 0.5)
    else:
        B = np.random.default_rng(1).normal(size=(4, 4))
        graph, k, gram = "all_to_all", 4, 3 * B @ B.T
    data = cd.TwoClassMixture(gram, np.ones(k))

    def f(g):
        return cd.mode_hierarchy(cd.CoupledOU(cd.coupling_matrix(graph, k, 1.0, g), 2.0), data).speciation.value

    for g in (0.05, 0.2):
        fd = (np.asarray(f(g + 1e-6)) - np.asarray(f(g - 1e-6))) / 2e-6
        assert np.all(np.isfinite(fd))
        np.testing.assert_allclose(np.asarray(jax.jacfwd(f)(g)), fd, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(np.asarray(jax.jacrev(f)(g)), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k", [8, pytest.param(16, marks=pytest.mark.slow)])
def test_joint_solvers_at_large_k_match_scipy_and_stability_matches_eigvals(k):
    """k > 4 runs on dense k x k arrays (`DenseMat`): the joint speciation and collapse times of a ring of k
    modalities against SciPy (expm, the Lyapunov solve, brentq), and Routh-Hurwitz against `np.linalg.eigvals`."""
    import scipy.optimize as so

    from coupled_diffusion._linalg import DenseMat, Mat, positive_stable

    ou = cd.CoupledOU.graph("ring", k, 1.0, 0.25, 2.0)
    M = np.asarray(ou.M)
    gram = equicorrelated(k, 2.0, 0.5)
    data = cd.TwoClassMixture(gram, np.full(k, 0.9))

    def kap(t):
        return ref.kappa(M, 2.0, gram, np.full(k, 0.9), t, E_Q_fn=ref.E_Q_lyapunov) - 1.0

    ts = np.linspace(1e-6, 20.0, 201)
    F = np.array([kap(t) for t in ts])
    j = np.flatnonzero(F >= 0)[-1]
    want = so.brentq(kap, ts[j], ts[j + 1], xtol=1e-14, rtol=1e-13)
    assert float(cd.speciation_time(ou, data, t_max=20.0).value) == pytest.approx(want, rel=1e-9)

    def lhs(t):
        E, Q = ref.E_Q_lyapunov(M, 2.0, t)
        C = 0.9 * E @ E.T + Q
        return (np.linalg.slogdet(C)[1] - np.linalg.slogdet(Q)[1]) / (2 * k) - 0.3

    assert float(cd.collapse_time(ou, data, alpha=0.3).value) == pytest.approx(so.brentq(lhs, 1e-8, 50.0, xtol=1e-15), rel=1e-9)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(20):
        X = rng.normal(size=(6, 6)) + rng.uniform(-1.0, 4.0) * np.eye(6)
        assert isinstance(Mat.of(X), DenseMat)
        want = bool(np.all(np.linalg.eigvals(X).real > 0))
        assert bool(positive_stable(Mat.of(X))) == want
        seen.add(want)
    assert seen == {True, False}
