"""PPEPS-WGM: the weighted EM is scikit-learn's EM on replicated points, the mixture weights are the shares of
positive effect at a fixed point, and separated blobs of effect become separate segments."""

from __future__ import annotations

import numpy as np
import pytest

from cft_lightning.critique.ppeps import _m_step, effect_mass, fit_weighted_gmm, pixel_grid, ppeps_segments
from cft_lightning.critique.sampling import lowest_entropy, predictive_entropy


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tol=0 runs every iteration
def test_integer_weights_equal_replicated_points_in_sklearn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal((0.2, 0.3), 0.05, (40, 2)), rng.normal((0.7, 0.6), 0.08, (40, 2))])
    weights = rng.integers(1, 5, len(points)).astype(float)
    init = np.array([[0.3, 0.3], [0.6, 0.7]])
    ours = fit_weighted_gmm(points, weights, components=2, max_iter=25, tol=0.0, init_means=init)
    # the same start for scikit-learn: our first M-step from the hard assignment to `init`
    labels = ((points[:, None] - init[None]) ** 2).sum(-1).argmin(1)
    pi, mu, cov = _m_step(points, weights / weights.mean(), np.eye(2)[labels], 1e-6)
    replicated = np.repeat(points, weights.astype(int), axis=0)
    sk = GaussianMixture(2, covariance_type="full", tol=0.0, max_iter=25, reg_covar=1e-6, weights_init=pi,
                         means_init=mu, precisions_init=np.linalg.inv(cov)).fit(replicated)
    assert np.allclose(ours.weights, sk.weights_, atol=1e-6)
    assert np.allclose(ours.means, sk.means_, atol=1e-6)
    assert np.allclose(ours.covariances, sk.covariances_, atol=1e-6)


def test_mixture_weights_are_the_shares_of_positive_effect():
    rng = np.random.default_rng(1)
    attribution = rng.normal(0, 1, (24, 20))
    attribution[3:8, 2:7] += 4.0
    attribution[15:22, 12:18] += 2.0
    mass = effect_mass(attribution).reshape(-1)
    assert mass.min() >= 0 and np.isclose(mass.sum(), 1.0) and (mass[attribution.reshape(-1) <= 0] == 0).all()
    gmm = fit_weighted_gmm(pixel_grid(24, 20), mass * mass.size, components=3, max_iter=500, tol=1e-12)
    r = gmm.responsibilities(pixel_grid(24, 20))
    assert gmm.converged
    assert np.allclose(gmm.weights, (mass[:, None] * r).sum(axis=0), atol=1e-6)  # pi_j = sum_i p_i r_ij
    assert np.isclose(gmm.weights.sum(), 1.0)


def test_separated_effects_become_separate_segments():
    attribution = -np.ones((32, 32))
    attribution[2:8, 2:8] = 3.0  # 36 px x 3 = 108
    attribution[22:30, 20:30] = 1.0  # 80 px x 1 = 80
    segments, shares, gmm = ppeps_segments(attribution, components=2)
    a, b = segments[4, 4], segments[25, 25]
    assert a != b and (segments[2:8, 2:8] == a).all() and (segments[22:30, 20:30] == b).all()
    assert np.isclose(shares[a], 108 / 188) and np.isclose(shares[b], 80 / 188)
    assert np.allclose(sorted(gmm.weights), sorted(shares), atol=1e-3)


def test_too_little_positive_effect_is_an_error():
    with pytest.raises(ValueError, match="positive weight"):
        ppeps_segments(-np.ones((8, 8)), components=2)


def test_low_entropy_sampling():
    import torch

    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    h = predictive_entropy(logits)
    assert torch.isclose(h[1], torch.tensor(np.log(2.0), dtype=h.dtype))
    assert h[0] < h[2] < h[1]
    entropy = dict(zip(["a", "b", "d", "c"], h.tolist()))
    assert lowest_entropy(entropy, 3) == ["a", "c", "d"]  # ties broken by key
    with pytest.raises(ValueError):
        lowest_entropy(entropy, 0)
