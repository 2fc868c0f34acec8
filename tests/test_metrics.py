import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples
from sklearn.neighbors import NearestNeighbors

from diffbio_eqx._core._metrics import (
    adjusted_rand_index,
    clisi,
    ilisi,
    lisi,
    normalized_mutual_info,
    silhouette_label,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ari_nmi_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, 300)
    noisy = np.where(rng.random(300) < 0.3, rng.integers(0, 7, 300), truth)
    assert adjusted_rand_index(truth, noisy) == pytest.approx(adjusted_rand_score(truth, noisy), abs=1e-12)
    assert normalized_mutual_info(truth, noisy) == pytest.approx(
        normalized_mutual_info_score(truth, noisy), abs=1e-12)
    assert adjusted_rand_index(truth, truth) == pytest.approx(1.0)
    assert normalized_mutual_info(["a"] * 5, ["x"] * 5) == 1.0


def _blobs(seed, n=300):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    batches = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 5)) + 4.0 * np.eye(5)[labels] + 0.5 * batches[:, None]
    return x, labels, batches


def _knn(x, k=90):
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return indices, distances


@pytest.mark.parametrize("seed", [0, 1])
def test_lisi_matches_scib_metrics(seed):
    from scib_metrics import clisi_knn, ilisi_knn, lisi_knn
    from scib_metrics.nearest_neighbors import NeighborsResults

    x, labels, batches = _blobs(seed)
    indices, distances = _knn(x)
    neighbours = NeighborsResults(indices=indices, distances=distances)
    ours = np.asarray(lisi(indices, distances, labels.astype(np.int32), n_labels=3))
    np.testing.assert_allclose(ours, lisi_knn(neighbours, labels), rtol=1e-4)
    assert ilisi(indices, distances, batches) == pytest.approx(ilisi_knn(neighbours, batches), abs=1e-4)
    assert clisi(indices, distances, labels) == pytest.approx(clisi_knn(neighbours, labels), abs=1e-4)


def test_silhouette_matches_sklearn():
    x, labels, _ = _blobs(3, n=200)
    expected = (np.mean(silhouette_samples(x, labels)) + 1) / 2
    assert silhouette_label(x, labels) == pytest.approx(expected, rel=1e-6)


def test_report_metrics_leave_out_the_silhouette_of_a_single_label():
    """`silhouette_label` refuses one label (as scikit-learn); the job report then has no silhouette to give,
    rather than failing (before: a NaN score)."""
    from diffbio_eqx._job import _integration_metrics

    x, _, _ = _blobs(3, n=200)
    metrics = _integration_metrics(x, None, np.zeros(x.shape[0], dtype=int))
    assert "silhouette_label" not in metrics and "cLISI" in metrics
