"""PPEPS-WGM (LVLM-VA): segments of an explanation by where its positive predictive effect lands.

The positive part of a pixel attribution, normalised, is a probability mass over the pixels:
p_i = max(Phi_i, 0) / sum_k max(Phi_k, 0). A Gaussian mixture over the pixel coordinates z_i in [0, 1]^2 is
fitted by EM with the weights w_i = M * p_i (M pixels), i.e. maximising sum_i w_i log sum_j pi_j N(z_i | mu_j,
Sigma_j). At a fixed point of EM the mixture weights are the shares of positive effect, pi_j = sum_i p_i r_ij,
and each pixel goes to its most responsible component (c_i = argmax_j r_ij): the segment map.

scikit-learn's `GaussianMixture.fit` takes no sample weights, hence this small weighted EM (full covariances,
`reg_covar` added to their diagonals as scikit-learn does); it starts from weighted k-means
(`KMeans(sample_weight=...)`). Pixels without positive effect do not move the fit and are assigned by the
fitted mixture like the others. Our defaults (J = 4, 100 iterations, tol 1e-4 on the mean weighted
log-likelihood) are choices: the paper does not publish them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WeightedGMM", "effect_mass", "fit_weighted_gmm", "pixel_grid", "ppeps_segments"]


@dataclass
class WeightedGMM:
    """A fitted mixture: weights (J,), means (J, 2), covariances (J, 2, 2), and how the fit ended."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    iterations: int
    converged: bool
    log_likelihood: float  # mean weighted log-likelihood per unit of weight

    def log_joint(self, points: np.ndarray) -> np.ndarray:
        """(N, J): log pi_j + log N(z_i | mu_j, Sigma_j)."""
        out = np.empty((len(points), len(self.weights)))
        for j, (mean, cov) in enumerate(zip(self.means, self.covariances)):
            chol = np.linalg.cholesky(cov)
            solved = np.linalg.solve(chol, (points - mean).T)  # (d, N)
            log_det = 2.0 * np.log(np.diag(chol)).sum()
            out[:, j] = (np.log(self.weights[j]) - 0.5 * (solved**2).sum(axis=0)
                         - 0.5 * (points.shape[1] * np.log(2 * np.pi) + log_det))
        return out

    def responsibilities(self, points: np.ndarray) -> np.ndarray:
        """(N, J): r_ij, the posterior of component j for point i."""
        joint = self.log_joint(points)
        joint -= joint.max(axis=1, keepdims=True)
        r = np.exp(joint)
        return r / r.sum(axis=1, keepdims=True)


def effect_mass(attribution: np.ndarray) -> np.ndarray:
    """p = max(Phi, 0) / sum max(Phi, 0) (zeros when nothing is positive)."""
    positive = np.clip(np.asarray(attribution, dtype=np.float64), 0.0, None)
    total = positive.sum()
    return positive / total if total > 0 else positive


def _m_step(points: np.ndarray, weights: np.ndarray, r: np.ndarray, reg_covar: float):
    wr = weights[:, None] * r  # (N, J)
    nk = wr.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = (wr.T @ points) / nk[:, None]
    covs = np.empty((len(nk), points.shape[1], points.shape[1]))
    for j in range(len(nk)):
        diff = points - means[j]
        covs[j] = (wr[:, j, None] * diff).T @ diff / nk[j] + reg_covar * np.eye(points.shape[1])
    return nk / weights.sum(), means, covs


def fit_weighted_gmm(
    points: np.ndarray,
    weights: np.ndarray,
    components: int = 4,
    max_iter: int = 100,
    tol: float = 1e-4,
    reg_covar: float = 1e-6,
    seed: int = 0,
    init_means: np.ndarray | None = None,
) -> WeightedGMM:
    """Weighted EM for a full-covariance Gaussian mixture. `weights` >= 0 (any scale); points with weight 0
    are ignored. Starts from weighted k-means (or `init_means`: hard assignment to the nearest mean)."""
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    keep = weights > 0
    if keep.sum() < components:
        raise ValueError(f"PPEPS-WGM: {int(keep.sum())} points with positive weight for {components} components")
    x, w = points[keep], weights[keep]
    w = w / w.mean()  # the scale of w does not change the optimum; this keeps the numbers tame
    if init_means is None:
        from sklearn.cluster import KMeans

        labels = KMeans(components, n_init=4, random_state=seed).fit(x, sample_weight=w).labels_
    else:
        labels = ((x[:, None, :] - np.asarray(init_means)[None]) ** 2).sum(-1).argmin(axis=1)
    r = np.eye(components)[labels]
    gmm = WeightedGMM(*_m_step(x, w, r, reg_covar), iterations=0, converged=False, log_likelihood=-np.inf)
    previous = -np.inf
    for it in range(1, max_iter + 1):
        joint = gmm.log_joint(x)
        top = joint.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(joint - top).sum(axis=1))
        r = np.exp(joint - log_norm[:, None])
        gmm.log_likelihood = float((w * log_norm).sum() / w.sum())
        gmm.weights, gmm.means, gmm.covariances = _m_step(x, w, r, reg_covar)
        gmm.iterations = it
        if abs(gmm.log_likelihood - previous) < tol:
            gmm.converged = True
            break
        previous = gmm.log_likelihood
    return gmm


def pixel_grid(height: int, width: int) -> np.ndarray:
    """(H*W, 2) normalised (row, col) coordinates in [0, 1], row-major."""
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)


def ppeps_segments(attribution: np.ndarray, components: int = 4, seed: int = 0,
                   max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, WeightedGMM]:
    """Segment an (H, W) attribution map: returns the segment map (H, W) int in [0, J), each segment's share
    of the positive effect under the hard assignment (J,), and the fitted mixture (whose `weights` are the
    soft shares). Segments that end up empty keep their index (share 0)."""
    height, width = attribution.shape
    mass = effect_mass(attribution).reshape(-1)
    grid = pixel_grid(height, width)
    gmm = fit_weighted_gmm(grid, mass * mass.size, components=components, seed=seed, max_iter=max_iter)
    segments = gmm.log_joint(grid).argmax(axis=1)
    shares = np.bincount(segments, weights=mass, minlength=components)
    return segments.reshape(height, width), shares, gmm
