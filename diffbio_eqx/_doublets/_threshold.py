"""Scrublet's automatic threshold on the simulated doublets' scores, and the fallback where it fails.

Scrublet (and `scanpy.pp.scrublet`) calls `skimage.filters.threshold_minimum(doublet_scores_sim)`: a 256-bin
histogram between the smallest and largest score, smoothed by a 3-wide running mean (reflecting edges) until it
has at most two local maxima; the threshold is the centre of the lowest bin between the two. Where the histogram
never has exactly two maxima (a unimodal simulated-score histogram), skimage raises, scanpy warns and calls no
cell a doublet. Here the fallback is Otsu's threshold (`skimage.filters.threshold_otsu`) on the same scores, which
always splits them in two; the result says which was used. Both are NumPy ports (the decision is host-side, as in
Scrublet); the tests compare them with skimage.
"""

import numpy as np
import scipy.ndimage as ndi


#: Histogram bins and smoothing rounds of skimage's `threshold_minimum`.
N_BINS, MAX_SMOOTHING = 256, 10_000


def _histogram(scores: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """skimage's `histogram(source_range="image")` for float data (256 bins between min and max)."""
    counts, edges = np.histogram(scores, bins=n_bins, range=(float(np.min(scores)), float(np.max(scores))))
    centers = (edges[:-1] + edges[1:]) / 2
    return counts.astype(np.float32), centers


def _local_maxima(hist: np.ndarray) -> list[int]:
    """skimage's plateau-safe local maxima: the first index of each descent after a rise."""
    maxima, direction = [], 1
    for i in range(hist.shape[0] - 1):
        if direction > 0 and hist[i + 1] < hist[i]:
            direction = -1
            maxima.append(i)
        elif direction < 0 and hist[i + 1] > hist[i]:
            direction = 1
    return maxima


def threshold_minimum(scores: np.ndarray) -> float | None:
    """`skimage.filters.threshold_minimum(scores)`, or None where skimage would raise (no two maxima)."""
    hist, centers = _histogram(np.asarray(scores, dtype=np.float64).ravel())
    maxima: list[int] = []
    counter = 0
    for counter in range(MAX_SMOOTHING):
        hist = ndi.uniform_filter1d(hist, 3)
        maxima = _local_maxima(hist)
        if len(maxima) < 3:
            break
    if len(maxima) != 2 or counter == MAX_SMOOTHING - 1:
        return None
    return float(centers[maxima[0] + int(np.argmin(hist[maxima[0]: maxima[1] + 1]))])


def threshold_otsu(scores: np.ndarray) -> float:
    """`skimage.filters.threshold_otsu(scores)`: the bin centre maximising the between-class variance."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if np.min(scores) == np.max(scores):
        return float(scores[0])
    hist, centers = _histogram(scores)
    hist = hist.astype(np.float64)
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    mean1 = np.cumsum(hist * centers) / weight1
    with np.errstate(divide="ignore", invalid="ignore"):
        mean2 = (np.cumsum((hist * centers)[::-1]) / weight2[::-1])[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.nanargmax(variance))])


def automatic_threshold(scores_sim: np.ndarray) -> tuple[float, str]:
    """Scrublet's threshold on the simulated scores, else Otsu's: `(threshold, "minimum" | "otsu")`."""
    threshold = threshold_minimum(scores_sim)
    if threshold is not None:
        return threshold, "minimum"
    return threshold_otsu(scores_sim), "otsu"
