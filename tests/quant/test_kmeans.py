"""1-D k-means: nearest-centroid assignments, a monotone objective, recovered clusters, every init, refusals."""

import math

import pytest
import torch

from tunelab.quant.kmeans import INITS, KMEANS_PP_MAX_SAMPLES, initial_centroids, kmeans_1d, kmeans_objective


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("init", INITS)
def test_assignments_are_the_nearest_centroid_and_centroids_the_means(init):
    x = torch.randn(5000) * torch.rand(5000)  # heavy-tailed-ish
    centroids, assignments = kmeans_1d(x, 16, init=init, generator=gen())
    assert centroids.shape == (16,) and centroids.dtype == torch.float32
    assert assignments.shape == (5000,) and assignments.dtype == torch.int64
    assert torch.all(centroids[1:] >= centroids[:-1])
    distances = (x[:, None] - centroids[None, :]).abs()  # (n, k) brute force
    chosen = distances.gather(1, assignments[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, distances.min(dim=1).values, atol=1e-6, rtol=0)
    # After convergence every non-empty centroid is the mean of its members.
    centroids, assignments = kmeans_1d(x, 16, init=init, iters=500, generator=gen())
    for j in assignments.unique():
        torch.testing.assert_close(centroids[j], x[assignments == j].mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_objective_never_increases_across_iterations(init):
    x = torch.cat([torch.randn(3000), 0.2 * torch.randn(1000) + 3])
    objectives = []
    for iters in range(12):  # same seed -> same init, so iters=t gives the t-th Lloyd iterate
        centroids, assignments = kmeans_1d(x, 8, init=init, iters=iters, generator=gen(1))
        objectives.append(kmeans_objective(x, centroids, assignments))
    for before, after in zip(objectives, objectives[1:]):
        assert after <= before * (1 + 1e-6), objectives
    assert objectives[-1] < objectives[0]  # Lloyd did something


@pytest.mark.parametrize("init", INITS)
def test_known_clusters_are_recovered(init):
    centres = torch.tensor([-5.0, -1.0, 2.0, 7.0])
    x = (centres[:, None] + 0.05 * torch.randn(4, 500)).flatten()  # 4 tight, far apart blobs
    x = x[torch.randperm(x.numel())]
    centroids, assignments = kmeans_1d(x, 4, init=init, iters=100, generator=gen(2))
    torch.testing.assert_close(centroids, centres, atol=0.02, rtol=0)
    truth = (x[:, None] - centres).abs().argmin(1)
    assert torch.equal(assignments, truth)


def test_kmeans_plus_plus_beats_linear_and_random_on_a_normal_tensor():
    x = torch.randn(20000)
    objective = {init: kmeans_objective(x, *kmeans_1d(x, 16, init=init, iters=1, generator=gen(3)))
                 for init in INITS}
    # one Lloyd step after seeding: D^2 seeding puts centroids where the mass is, linear wastes them on the tails
    assert objective["kmeans++"] < objective["linear"]
    assert objective["kmeans++"] < objective["random"]


def test_k_at_least_the_number_of_distinct_values_is_exact():
    x = torch.tensor([3.0, 1.0, 1.0, 2.0, 3.0])
    centroids, assignments = kmeans_1d(x, 5)
    assert torch.equal(centroids, torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0]))  # spare centroids repeat the max
    assert torch.equal(centroids[assignments], x)
    centroids, assignments = kmeans_1d(torch.full((4, 4), -0.5), 16, init="linear")
    assert torch.equal(centroids, torch.full((16,), -0.5))
    assert torch.equal(assignments, torch.zeros(16, dtype=torch.long))
    centroids, assignments = kmeans_1d(torch.tensor([7.0]), 1)
    assert centroids.tolist() == [7.0] and assignments.tolist() == [0]


def test_k_equal_one_gives_the_mean():
    x = torch.randn(1000)
    centroids, assignments = kmeans_1d(x, 1, init="linear")
    torch.testing.assert_close(centroids, x.mean().reshape(1))
    assert torch.equal(assignments, torch.zeros(1000, dtype=torch.long))


def test_random_init_draws_distinct_data_values():
    x = torch.cat([torch.zeros(900), torch.randn(100)])  # a pruned-looking tensor: 90% zeros
    start = initial_centroids(torch.sort(x.double()).values, 8, "random", gen(4))
    assert start.unique().numel() == 8
    assert torch.isin(start.float(), x).all()


def test_generator_makes_results_reproducible_and_large_inputs_are_fast_enough():
    x = torch.randn(4 * KMEANS_PP_MAX_SAMPLES)  # above the k-means++ subsample threshold
    first = kmeans_1d(x, 16, generator=gen(5))
    second = kmeans_1d(x, 16, generator=gen(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # 16 clusters of a standard normal: the optimal (Lloyd-Max) MSE is about 0.0095
    assert kmeans_objective(x, *first) / x.numel() < 0.011


def test_sklearn_agrees_when_installed():
    sklearn_cluster = pytest.importorskip("sklearn.cluster", reason="optional comparison: pip install scikit-learn")
    x = torch.cat([torch.randn(2000), 0.3 * torch.randn(500) + 4])
    ours = kmeans_objective(x, *kmeans_1d(x, 8, iters=300, generator=gen(6)))
    theirs = sklearn_cluster.KMeans(8, n_init=10, random_state=0).fit(x[:, None].numpy()).inertia_
    assert ours <= theirs * 1.02


@pytest.mark.parametrize("values, k, init, error, message", [
    (torch.randn(10), 0, "linear", ValueError, "k must be >= 1, got 0"),
    (torch.randn(10), 2.0, "linear", TypeError, "k must be an int"),
    (torch.empty(0), 2, "linear", ValueError, "values is empty"),
    (torch.tensor([1.0, math.nan]), 2, "linear", ValueError, "must be finite, found nan"),
    (torch.tensor([1.0, -math.inf]), 2, "linear", ValueError, "must be finite, found -inf"),
    (torch.randn(10), 2, "kmeans_plus_plus", ValueError, "unknown init 'kmeans_plus_plus'"),
    ([1.0, 2.0], 2, "linear", TypeError, "values must be a torch.Tensor, got list"),
])
def test_bad_input_is_refused_by_name(values, k, init, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        kmeans_1d(values, k, init=init)
