"""Spatial transcriptomics with known truth: a tissue of layered or blob-shaped domains, and slices cut from it.

The tissue is a `width x height` rectangle (spot spacing 1). Its domains are either cortical-style layers (bands
along y whose boundaries undulate with x) or blobs (discs on a background domain). Expression per spot is a
gamma-Poisson draw around `base * marker programme of the spot's domain * smooth gradient * library size`, with
logistic dropout of low means (as Splatter's dropout). Markers are modest and most genes carry no domain signal, so
expression alone separates domains only roughly and the spatial neighbourhood matters, as in real tissue.

`simulate_spatial_slices` cuts several slices from one tissue: each slice sees spots on its own grid (hexagonal,
square or scattered) over a window of the tissue (partial overlap), with spot jitter, and then reports them in its
own frame, rotated by a known angle and translated. `tissue_coordinates` of each spot give the truth an alignment
should recover; the `rotation`/`translation` map tissue coordinates to the slice's observed ones:
`observed = tissue @ R(rotation).T + translation`.

Random draws use NumPy's generator seeded from `seed` (host-side arrays, like `simulate_sparse`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .._core._validate import check_finite, check_nonnegative, check_positive, check_whole


Layout = Literal["layers", "blobs"]
Grid = Literal["hex", "square", "scatter"]


@dataclasses.dataclass(frozen=True)
class SpatialTissue:
    """The tissue every slice is cut from: its domains as a function of position, and gene programmes.

    - `width`, `height`: the tissue rectangle, in spot spacings.
    - `layout`: `"layers"` or `"blobs"`; `n_domains`: number of domains.
    - `base_means`: `(n_genes,)` gene means at library size 1 (sum to one).
    - `marker_factors`: `(n_domains, n_genes)` multiplicative domain programmes (1 off-marker).
    - `gradient`: `(n_genes,)` log-slope of each gene's mean along x over the tissue width (0 for most genes).
    - `blob_centers`, `blob_radii`: the blobs' discs (empty for layers); `wave`: the layers' boundary amplitude.
    """

    width: float
    height: float
    layout: str
    n_domains: int
    base_means: np.ndarray
    marker_factors: np.ndarray
    gradient: np.ndarray
    blob_centers: np.ndarray
    blob_radii: np.ndarray
    wave: float

    def domain_at(self, xy: np.ndarray) -> np.ndarray:
        """The true domain (int32) of tissue positions `xy` `(n, 2)`."""
        x, y = xy[:, 0], xy[:, 1]
        if self.layout == "layers":
            bent = y + self.wave * np.sin(2 * np.pi * x / self.width)
            return np.clip(np.floor(bent / self.height * self.n_domains), 0, self.n_domains - 1).astype(np.int32)
        distance = np.linalg.norm(xy[:, None, :] - self.blob_centers[None, :, :], axis=-1) / self.blob_radii
        inside = distance.min(axis=1) <= 1.0
        return np.where(inside, 1 + distance.argmin(axis=1), 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SpatialSlice:
    """One simulated slice.

    - `counts`: `(n_spots, n_genes)` float32 whole-number counts.
    - `coordinates`: `(n_spots, 2)` observed positions (the slice's own frame).
    - `tissue_coordinates`: `(n_spots, 2)` true positions in the tissue frame (jitter included).
    - `domains`: `(n_spots,)` int32 true domains.
    - `rotation`: angle in radians and `translation` `(2,)`: `observed = tissue @ R.T + translation`.
    - `spacing`: distance between neighbouring grid spots (1).
    """

    counts: np.ndarray
    coordinates: np.ndarray
    tissue_coordinates: np.ndarray
    domains: np.ndarray
    rotation: float
    translation: np.ndarray
    spacing: float = 1.0


def rotation_matrix(angle: float) -> np.ndarray:
    """The 2 x 2 matrix of a counter-clockwise rotation by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _check_programmes(*, n_genes: Any, n_domains: Any, n_markers: Any, n_gradient_genes: Any, marker_fold: Any,
                      gradient_strength: Any) -> None:
    """The tissue's sizes and gene programmes (a fold of 0 zeroes the markers, fewer than one marker leaves a domain
    without a signal, a NaN strength turns every mean NaN)."""
    for name, value, minimum in (("n_genes", n_genes, 1), ("n_domains", n_domains, 1), ("n_markers", n_markers, 1),
                                 ("n_gradient_genes", n_gradient_genes, 0)):
        check_whole(value, name, minimum=minimum)
    check_positive(marker_fold, "marker_fold")
    check_finite(gradient_strength, "gradient_strength")


def make_tissue(
    *, width: float, height: float, n_genes: int = 200, n_domains: int = 5, layout: Layout = "layers",
    n_markers: int = 8, marker_fold: float = 1.8, n_gradient_genes: int = 10, gradient_strength: float = 0.5,
    seed: int = 0,
) -> SpatialTissue:
    """Draw a tissue: base gene means, `n_markers` marker genes per domain (up by `marker_fold`), and
    `n_gradient_genes` genes whose log-mean rises by `gradient_strength` across the tissue width."""
    if layout not in ("layers", "blobs"):
        raise ValueError(f"layout: must be 'layers' or 'blobs', got {layout!r}")
    _check_programmes(n_genes=n_genes, n_domains=n_domains, n_markers=n_markers, n_gradient_genes=n_gradient_genes,
                      marker_fold=marker_fold, gradient_strength=gradient_strength)
    if n_domains < 2 or n_domains * n_markers + n_gradient_genes > n_genes:
        raise ValueError(f"n_genes: {n_genes} genes cannot hold {n_domains} domains x {n_markers} markers "
                         f"and {n_gradient_genes} gradient genes (need n_domains >= 2)")
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1 / 0.3, n_genes) + 0.05
    base = base / base.sum()
    genes = rng.permutation(n_genes)
    factors = np.ones((n_domains, n_genes))
    for d in range(n_domains):
        markers = genes[d * n_markers:(d + 1) * n_markers]
        factors[d, markers] = marker_fold * np.exp(0.2 * rng.normal(size=n_markers))
    gradient = np.zeros(n_genes)
    gradient[genes[n_domains * n_markers:n_domains * n_markers + n_gradient_genes]] = gradient_strength
    centers, radii = np.zeros((0, 2)), np.zeros(0)
    if layout == "blobs":
        centers = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height], (n_domains - 1, 2))
        radii = rng.uniform(0.12, 0.2, n_domains - 1) * min(width, height)
    return SpatialTissue(float(width), float(height), layout, n_domains, base, factors, gradient, centers, radii,
                         wave=0.06 * height)


def grid_points(width: float, height: float, kind: Grid, rng: np.random.Generator) -> np.ndarray:
    """Spots over a `width x height` window at spacing 1: a hexagonal (Visium-like) or square grid, or uniformly
    scattered at the same density."""
    if kind == "hex":
        rows = np.arange(0, height, np.sqrt(3) / 2)
        points = [np.stack([np.arange(0.5 * (i % 2), width, 1.0), np.full(len(np.arange(0.5 * (i % 2), width, 1.0)),
                                                                         r)], 1) for i, r in enumerate(rows)]
        return np.concatenate(points)
    if kind == "square":
        xs, ys = np.meshgrid(np.arange(0, width, 1.0), np.arange(0, height, 1.0))
        return np.stack([xs.ravel(), ys.ravel()], 1)
    if kind == "scatter":
        n = int(round(width * height))
        return rng.uniform([0, 0], [width, height], (n, 2))
    raise ValueError(f"grid: must be 'hex', 'square' or 'scatter', got {kind!r}")


def expression(
    tissue: SpatialTissue, xy: np.ndarray, domains: np.ndarray, rng: np.random.Generator, *,
    library_size: float = 1000.0, bcv: float = 0.3, dropout_mid: float = -1.0,
) -> np.ndarray:
    """Gamma-Poisson counts `(n, n_genes)` at tissue positions `xy` of the given domains, with logistic dropout
    of entries whose mean is low (midpoint `dropout_mid` in log-mean)."""
    n = xy.shape[0]
    ramp = (xy[:, :1] / tissue.width - 0.5) * tissue.gradient[None, :]
    libraries = library_size * np.exp(0.3 * rng.normal(size=(n, 1)))
    means = tissue.base_means[None, :] * tissue.marker_factors[domains] * np.exp(ramp) * libraries
    shape = 1.0 / bcv**2
    counts = rng.poisson(rng.gamma(shape, means / shape))
    keep = rng.uniform(size=counts.shape) > 1.0 / (1.0 + np.exp(2.0 * (np.log(means) - dropout_mid)))
    return (counts * keep).astype(np.float32)


def simulate_spatial(
    n_spots: int = 1000, *, n_genes: int = 200, n_domains: int = 5, layout: Layout = "layers", grid: Grid = "hex",
    marker_fold: float = 1.8, library_size: float = 1000.0, gradient_strength: float = 0.5, seed: int = 0,
) -> SpatialSlice:
    """One slice of about `n_spots` spots covering a whole square tissue (no rotation, no jitter)."""
    return simulate_spatial_slices(1, n_spots, grid=grid, rotations=(0.0,), translations=((0.0, 0.0),), jitter=0.0,
                                   overlap=1.0, seed=seed, n_genes=n_genes, n_domains=n_domains, layout=layout,
                                   marker_fold=marker_fold, library_size=library_size,
                                   gradient_strength=gradient_strength)[0]


def _check_slicing(n_slices: Any, n_spots: Any, *, library_size: Any, jitter: Any, overlap: Any) -> None:
    """Sizes and settings of the slices (a NaN jitter gave a raw out-of-bounds index, a negative library size a
    NumPy "scale < 0")."""
    check_whole(n_slices, "n_slices")
    check_whole(n_spots, "n_spots")
    check_positive(library_size, "library_size")
    check_nonnegative(jitter, "jitter")
    if not 0.0 < overlap <= 1.0:
        raise ValueError(f"overlap: must be in (0, 1], got {overlap}")


def _check_placements(n_slices: int, rotations: Sequence[float | int],
                      translations: Sequence[Sequence[float | int]]) -> None:
    """One finite angle and one finite 2-D shift per slice."""
    if len(rotations) != n_slices or len(translations) != n_slices:
        raise ValueError(f"rotations, translations: need {n_slices} each, got {len(rotations)}, {len(translations)}")
    check_finite(rotations, "rotations")
    shifts = np.asarray(translations, dtype=object)
    if shifts.shape != (n_slices, 2):
        raise ValueError(f"translations: expected one (x, y) shift per slice, shape ({n_slices}, 2), got "
                         f"{shifts.shape}")
    check_finite(shifts.astype(np.float64), "translations")


def simulate_spatial_slices(
    n_slices: int = 2, n_spots: int = 1000, *, grid: Grid = "hex", rotations: Sequence[float | int] | None = None,
    translations: Sequence[Sequence[float | int]] | None = None, jitter: float = 0.1, overlap: float = 1.0,
    seed: int = 0, **tissue: Any,
) -> list[SpatialSlice]:
    """`n_slices` slices of one tissue, each about `n_spots` spots on its own grid.

    **Arguments:**

    - `grid`: `"hex"` (Visium-like), `"square"` or `"scatter"`.
    - `rotations`: radians per slice (default: 0 for the first, then uniform in [-30, 30] degrees).
    - `translations`: per slice (default: 0 for the first, then uniform in [-5, 5] spacings per axis).
    - `jitter`: standard deviation of each spot's displacement, in spot spacings.
    - `overlap`: share of the tissue width each slice covers; windows slide along x so consecutive slices
      overlap on `overlap` of their width (1: every slice covers the whole tissue).
    - `tissue`: `make_tissue`'s settings (`n_genes` 200, `n_domains` 5, `layout` "layers", `marker_fold` 1.8,
      `gradient_strength` 0.5, ...) and `library_size` (1000).
    """
    library_size = tissue.pop("library_size", 1000.0)
    _check_slicing(n_slices, n_spots, library_size=library_size, jitter=jitter, overlap=overlap)
    library_size = float(library_size)
    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n_spots * (np.sqrt(3) / 2 if grid == "hex" else 1.0)))
    window = side
    width = side if overlap == 1.0 else side * (1 + (1 - overlap) * (n_slices - 1))
    tissue_model = make_tissue(width=width, height=side, seed=int(rng.integers(2**31)), **tissue)
    if rotations is None:
        rotations = (0.0, *np.deg2rad(rng.uniform(-30, 30, n_slices - 1)))
    if translations is None:
        translations = ((0.0, 0.0), *map(tuple, rng.uniform(-5, 5, (n_slices - 1, 2))))
    _check_placements(n_slices, rotations, translations)
    slices = []
    for i in range(n_slices):
        offset = 0.0 if overlap == 1.0 else i * (1 - overlap) * window
        xy = grid_points(window, side, grid, rng) + np.array([offset, 0.0])
        xy = xy + jitter * rng.normal(size=xy.shape)
        domains = tissue_model.domain_at(xy)
        counts = expression(tissue_model, xy, domains, rng, library_size=library_size)
        angle, shift = float(rotations[i]), np.asarray(translations[i], dtype=np.float64)
        observed = xy @ rotation_matrix(angle).T + shift
        slices.append(SpatialSlice(counts, observed, xy, domains, angle, shift))
    return slices
