"""k-means in one dimension: the codebook behind weight clustering and k-means quantization.

Lloyd's algorithm minimises the within-cluster sum of squares J = sum_i (x_i - c_{a(i)})^2 by alternating
    assign: a(i) = argmin_j |x_i - c_j|          update: c_j = mean{x_i : a(i) = j}
In 1-D the clusters of sorted centroids are intervals split at the midpoints (c_j + c_{j+1}) / 2, so on the
sorted values one iteration is k searchsorted calls plus prefix sums: O(k log n) instead of O(n k).
Starting points follow TF Model Optimization's `CentroidInitialization` (linear, random, density-based) and
k-means++ (Arthur & Vassilvitskii 2007, "k-means++: The Advantages of Careful Seeding").
"""

from __future__ import annotations

import torch
from torch import Tensor

INITS = ("linear", "random", "density", "kmeans++")
# k-means++ costs O(n k); above this many values it seeds on a fixed random subsample (then Lloyd uses all).
KMEANS_PP_MAX_SAMPLES = 1 << 16


def kmeans_1d(values: Tensor, k: int, init: str = "kmeans++", iters: int = 30,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Cluster the entries of `values` into k groups with Lloyd's algorithm (ties go to the lower centroid).

    Args:
        values: any shape, real dtype; flattened. Must be non-empty and finite.
        k: number of centroids, >= 1. With k >= the number of distinct values d every distinct value is its
            own centroid (J = 0) and the k - d spare centroids repeat the largest value and own no entries.
        init: "linear" | "random" | "density" | "kmeans++" (see `initial_centroids`).
        iters: at most this many Lloyd iterations (0 returns the initial centroids); stops early when no
            entry changes cluster. An empty cluster keeps its centroid where it was.
        generator: randomness of "random" and "kmeans++" (None: torch's global generator).

    Returns:
        centroids: (k,) float32, sorted ascending.
        assignments: (n,) int64 index into `centroids` of each flattened entry.
    """
    x = check_values(values)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")

    sorted_x = torch.sort(x.double()).values  # (n,)
    distinct = torch.unique_consecutive(sorted_x)  # (d,)
    if k >= distinct.numel():
        spare = distinct[-1].expand(k - distinct.numel())
        centroids = torch.cat([distinct, spare]).float()
        return centroids, assign(x, centroids)

    centroids = initial_centroids(sorted_x, k, init, generator).double()  # (k,)
    prefix = torch.cat([sorted_x.new_zeros(1), torch.cumsum(sorted_x, 0)])  # (n + 1,) sums of the first i values
    edges = None
    for _ in range(iters):
        new_edges = cluster_edges(sorted_x, centroids)  # (k + 1,) cluster j is sorted_x[edges[j]:edges[j+1]]
        if edges is not None and torch.equal(new_edges, edges):
            break  # same partition: the update would give the same centroids
        edges = new_edges
        counts = edges[1:] - edges[:-1]  # (k,)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]  # (k,)
        means = sums / counts.clamp(min=1)
        centroids = torch.where(counts > 0, means, centroids)
    centroids = torch.sort(centroids.float()).values
    return centroids, assign(x, centroids)


def check_values(values: Tensor) -> Tensor:
    """Flatten `values` to float32, refusing non-tensors, empty and non-finite input."""
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"values must be real numbers, got dtype {values.dtype}")
    if values.numel() == 0:
        raise ValueError(f"values is empty (shape {tuple(values.shape)}); k-means needs at least one value")
    x = values.detach().flatten().float()  # (n,)
    if not torch.isfinite(x).all():
        bad = x[~torch.isfinite(x)][0].item()
        raise ValueError(f"values must be finite, found {bad} ({int((~torch.isfinite(x)).sum())} non-finite)")
    return x


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of the sorted `centroids` (k,) for each value of x (n,); ties go to the lower one."""
    midpoints = (centroids[1:].double() + centroids[:-1].double()) / 2  # (k - 1,)
    return torch.searchsorted(midpoints, x.double(), right=False)  # x == midpoint -> lower cluster


def cluster_edges(sorted_x: Tensor, centroids: Tensor) -> Tensor:
    """Start offsets (k + 1,) of each centroid's interval in `sorted_x`, consistent with `assign`."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2  # (k - 1,)
    inner = torch.searchsorted(sorted_x, midpoints, right=True)  # values <= midpoint belong to the lower cluster
    return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), sorted_x.numel())])


def kmeans_objective(values: Tensor, centroids: Tensor, assignments: Tensor | None = None) -> float:
    """Within-cluster sum of squares J = sum_i (x_i - c_{a(i)})^2 (nearest centroid when no assignments)."""
    x = check_values(values).double()
    c = torch.sort(centroids.detach().double().flatten()).values if assignments is None else centroids.double()
    a = assign(x, c) if assignments is None else assignments
    return float(((x - c[a]) ** 2).sum())


def initial_centroids(sorted_x: Tensor, k: int, init: str, generator: torch.Generator | None = None) -> Tensor:
    """k starting centroids (float64, sorted) from the sorted values (n,), for k < number of distinct values.

    linear: evenly spaced between min and max (TF's LINEAR). random: k distinct data values, each drawn with
    probability proportional to its frequency (Forgy; TF's RANDOM instead samples uniformly in [min, max]).
    density: the inverse CDF at the levels (j + 1/2) / k (TF's DENSITY_BASED spaces the levels evenly on the CDF).
    kmeans++: the first centroid a random value, each next one drawn with probability proportional to D(x)^2,
    its squared distance to the nearest centroid chosen so far (Arthur & Vassilvitskii 2007).
    """
    n = sorted_x.numel()
    if init == "linear":
        return torch.linspace(float(sorted_x[0]), float(sorted_x[-1]), k, dtype=torch.float64)
    if init == "density":
        levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k  # (k,)
        return sorted_x[(levels * n).long().clamp(max=n - 1)]
    if init == "random":
        distinct, counts = torch.unique_consecutive(sorted_x, return_counts=True)
        picked = torch.multinomial(counts.double(), k, replacement=False, generator=generator)
        return torch.sort(distinct[picked]).values
    if init == "kmeans++":
        return kmeans_plus_plus(sorted_x, k, generator)
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


def kmeans_plus_plus(sorted_x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """D^2 seeding over the distinct values weighted by their counts (the same law as over every entry).

    Inputs above KMEANS_PP_MAX_SAMPLES entries are seeded on that many entries drawn once at random (with
    `generator`); if the sample holds fewer than k distinct values, all the data is used instead.
    """
    sample = sorted_x
    if sorted_x.numel() > KMEANS_PP_MAX_SAMPLES:
        picks = torch.randint(sorted_x.numel(), (KMEANS_PP_MAX_SAMPLES,), generator=generator)
        sample = torch.sort(sorted_x[picks]).values
    distinct, counts = torch.unique_consecutive(sample, return_counts=True)  # (d,), (d,)
    if distinct.numel() < k:
        distinct, counts = torch.unique_consecutive(sorted_x, return_counts=True)
    weights = counts.double()
    first = torch.multinomial(weights, 1, generator=generator)
    chosen = [distinct[first]]
    nearest_sq = (distinct - chosen[0]) ** 2  # (d,) D(x)^2
    for _ in range(k - 1):
        # k < d, so some distinct value is still unchosen and has D(x)^2 > 0
        pick = torch.multinomial(weights * nearest_sq, 1, generator=generator)
        chosen.append(distinct[pick])
        nearest_sq = torch.minimum(nearest_sq, (distinct - distinct[pick]) ** 2)
    return torch.sort(torch.cat(chosen)).values
