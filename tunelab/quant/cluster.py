"""Weight clustering: each layer keeps k shared values (a codebook) and one small index per weight.

    W[i, j] = c[a[i, j]]        c: (k,) centroids (k-means of the layer's weights), a: indices, uint8, W's shape
Training then moves only the centroids (and biases): the forward gathers c[a], so autograd sums the gradient
of every member of a cluster into its centroid, dL/dc_m = sum_{a(ij) = m} dL/dW_ij, and the indices never
change ("cluster-preserving" fine-tuning; Han et al. 2016, "Deep Compression", arXiv 1510.00149, section 3.3).
The API follows TF Model Optimization's `cluster_weights` / `strip_clustering` (number_of_clusters,
cluster_centroids_init LINEAR / RANDOM / DENSITY_BASED / KMEANS_PLUS_PLUS, and its sparsity-preserving variant).

With `preserve_sparsity` a pruned layer keeps its exact zeros: they get a centroid of their own that is pinned at
0 and never trains (prune -> cluster, Deep Compression's first two stages). Such a layer is stored as a 1-bit
mask plus the indices of the non-zero weights only, whenever that is the smaller of the two layouts.

Saving: a clustered module's state_dict holds the packed form (`centroids`, `bias`, and `packed_indices`, or
`packed_mask` + `packed_indices` of the non-zeros), so `save_clustered(model, file)` writes the state_dict with
tunelab.core.io.write_safetensors plus the layout of the clustered layers in the header, and
`load_clustered(fresh_model, file)` swaps in empty clustered layers and loads it back (identical logits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.io import read_safetensors, write_safetensors
from tunelab.quant.kmeans import INITS, kmeans_1d
from tunelab.quant.select import select_layers
from tunelab.quant.uniform import pack, unpack

# TF Model Optimization's CentroidInitialization names -> ours
TF_INITS = {"LINEAR": "linear", "RANDOM": "random", "DENSITY_BASED": "density", "KMEANS_PLUS_PLUS": "kmeans++"}
MAX_CLUSTERS = 256  # indices are uint8
LAYOUT_KEY = "tunelab.quant.cluster_layout"


def index_bits(n_clusters: int) -> int:
    """Bits each stored index takes: ceil(log2 k) rounded up to a whole number of codes per byte (2, 4 or 8)."""
    needed = max(1, math.ceil(math.log2(n_clusters)))
    return next(bits for bits in (2, 4, 8) if bits >= needed)


def fit_codebook(weight: Tensor, n_clusters: int, init: str = "kmeans++", preserve_sparsity: bool = False,
                 iters: int = 30, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int | None]:
    """k-means codebook of a weight: (centroids (k,) float32 ascending, indices uint8 of weight's shape, zero_index).

    With `preserve_sparsity` and exact zeros present, k - 1 centroids cluster the non-zero weights and one more
    centroid, exactly 0 and at position `zero_index`, takes the zeros; otherwise zero_index is None.
    """
    check_n_clusters(n_clusters)
    init = resolve_init(init)
    w = weight.detach().float().cpu()  # k-means runs on the CPU (a CPU generator); the layer moves back after
    zeros = w == 0
    if not (preserve_sparsity and bool(zeros.any())):
        centroids, assignments = kmeans_1d(w, n_clusters, init, iters, generator)
        return centroids, assignments.reshape(w.shape).to(torch.uint8), None
    if bool(zeros.all()):
        return torch.zeros(n_clusters), torch.zeros(w.shape, dtype=torch.uint8), 0
    nonzero_centroids, nonzero_assignments = kmeans_1d(w[~zeros], n_clusters - 1, init, iters, generator)
    zero_index = int((nonzero_centroids < 0).sum())  # insert 0 where it keeps the codebook ascending
    centroids = torch.cat([nonzero_centroids[:zero_index], torch.zeros(1), nonzero_centroids[zero_index:]])
    shifted = nonzero_assignments + (nonzero_assignments >= zero_index).long()  # indices past 0 move up by one
    indices = torch.full(w.shape, zero_index, dtype=torch.uint8)
    indices[~zeros] = shifted.to(torch.uint8)
    return centroids, indices, zero_index


class ClusteredWeight(nn.Module):
    """What clustered layers share: the trainable codebook `centroids` (k,), the frozen `indices` (uint8 buffer of
    the weight's shape), the optional frozen zero centroid, sizing and the packed state_dict."""

    def __init__(self, weight_shape: tuple[int, ...], n_clusters: int, zero_index: int | None = None):
        super().__init__()
        check_n_clusters(n_clusters)
        if zero_index is not None and not 0 <= zero_index < n_clusters:
            raise ValueError(f"zero_index must be in [0, {n_clusters}), got {zero_index}")
        self.weight_shape, self.n_clusters, self.zero_index = tuple(weight_shape), n_clusters, zero_index
        self.index_bits = index_bits(n_clusters)
        self.centroids = nn.Parameter(torch.zeros(n_clusters))  # (k,)
        # not persistent: the state_dict holds the packed form instead (see _save_to_state_dict)
        self.register_buffer("indices", torch.zeros(self.weight_shape, dtype=torch.uint8), persistent=False)

    def set_codebook(self, centroids: Tensor, indices: Tensor) -> None:
        with torch.no_grad():
            self.centroids.copy_(centroids)
            self.indices.copy_(indices)

    def codebook(self) -> Tensor:
        """The centroids (k,) with the frozen zero forced to 0, so it neither moves nor passes gradient."""
        if self.zero_index is None:
            return self.centroids
        return self.centroids.index_fill(0, torch.tensor([self.zero_index], device=self.centroids.device), 0.0)

    def dequantize_weight(self) -> Tensor:
        """The float weight c[a] the codebook and indices stand for (differentiable in the centroids)."""
        return self.codebook()[self.indices.long()]

    @property
    def weight(self) -> Tensor:
        return self.dequantize_weight()

    # sizing and storage ---------------------------------------------------------------------------------
    def uses_sparse_layout(self) -> bool:
        """A 1-bit mask + non-zero indices when the layer has a frozen zero and that is smaller than all indices."""
        if self.zero_index is None:
            return False
        numel, nonzero = self.indices.numel(), int((self.indices != self.zero_index).sum())
        sparse_bytes = math.ceil(numel / 8) + math.ceil(nonzero * self.index_bits / 8)
        return sparse_bytes < math.ceil(numel * self.index_bits / 8)

    def packed_indices(self) -> dict[str, Tensor]:
        """The stored form of the indices: {"packed_indices"} or {"packed_mask", "packed_indices"} (uint8)."""
        flat = self.indices.flatten()
        if not self.uses_sparse_layout():
            return {"packed_indices": pack(flat, self.index_bits)}
        kept = flat != self.zero_index
        return {"packed_mask": pack_mask(kept), "packed_indices": pack(flat[kept], self.index_bits)}

    def unpack_indices(self, packed: dict[str, Tensor]) -> Tensor:
        """Inverse of `packed_indices`: the uint8 indices of the weight's shape."""
        numel = math.prod(self.weight_shape)
        kept = unpack_mask(packed["packed_mask"], numel) if "packed_mask" in packed else None
        count = numel if kept is None else int(kept.sum())
        expected = math.ceil(count * self.index_bits / 8)
        if packed["packed_indices"].dtype != torch.uint8 or packed["packed_indices"].numel() != expected:
            raise ValueError(f"{count} indices of {self.index_bits} bits take {expected} uint8 bytes, got "
                             f"{packed['packed_indices'].numel()} of {packed['packed_indices'].dtype}")
        if kept is None:
            return unpack(packed["packed_indices"], self.index_bits, numel).reshape(self.weight_shape)
        if self.zero_index is None:
            raise ValueError("a packed_mask needs a layer with a frozen zero centroid (zero_index)")
        flat = torch.full((numel,), self.zero_index, dtype=torch.uint8)
        flat[kept] = unpack(packed["packed_indices"], self.index_bits, count)
        return flat.reshape(self.weight_shape)

    def size_info(self) -> dict:
        """params: weights + bias; bytes: packed indices (+ mask) + float32 codebook + float32 bias; nonzeros."""
        bias = getattr(self, "bias", None)
        stored = sum(t.numel() for t in self.packed_indices().values())  # uint8: one byte each
        bias_params = 0 if bias is None else bias.numel()
        weight_nonzeros = int(self.dequantize_weight().count_nonzero())
        return {"params": self.indices.numel() + bias_params, "bytes": stored + 4 * self.n_clusters + 4 * bias_params,
                "nonzeros": weight_nonzeros + (0 if bias is None else int(bias.count_nonzero()))}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # centroids, bias
        for name, tensor in self.packed_indices().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        packed = {n: state_dict[prefix + n] for n in ("packed_indices", "packed_mask") if prefix + n in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in packed:
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)
        if "packed_indices" not in packed:
            missing_keys.append(prefix + "packed_indices")
            return
        try:
            self.indices.copy_(self.unpack_indices(packed))
        except (ValueError, RuntimeError) as error:
            error_msgs.append(f"{prefix}packed_indices: {error}")

    def layout(self) -> dict:
        return {"n_clusters": self.n_clusters, "zero_index": self.zero_index}


class ClusteredLinear(ClusteredWeight):
    """y = x (c[a])^T + b: a linear layer whose (out, in) weight is a k-entry codebook and uint8 indices."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n_clusters: int = 16,
                 zero_index: int | None = None):
        super().__init__((out_features, in_features), n_clusters, zero_index)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, n_clusters: int = 16, init: str = "kmeans++",
                    preserve_sparsity: bool = False, iters: int = 30,
                    generator: torch.Generator | None = None) -> "ClusteredLinear":
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(layer).__name__}")
        centroids, indices, zero_index = fit_codebook(layer.weight, n_clusters, init, preserve_sparsity, iters,
                                                      generator)
        clustered = cls(layer.in_features, layer.out_features, layer.bias is not None, n_clusters, zero_index)
        clustered.set_codebook(centroids, indices)
        if layer.bias is not None:
            clustered.bias.data.copy_(layer.bias.detach().float())
        return clustered.to(layer.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize_weight(), self.bias)  # (..., out)

    def to_plain(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(self.dequantize_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.to(self.centroids.device)

    def layout(self) -> dict:
        return {"class": "ClusteredLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **super().layout()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_clusters={self.n_clusters}, "
                f"zero_index={self.zero_index}")


class ClusteredEmbedding(ClusteredWeight):
    """An embedding table (V, C) stored as a codebook and indices; a lookup gathers only the rows it needs."""

    def __init__(self, num_embeddings: int, embedding_dim: int, n_clusters: int = 16, padding_idx: int | None = None,
                 zero_index: int | None = None):
        super().__init__((num_embeddings, embedding_dim), n_clusters, zero_index)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, n_clusters: int = 16, init: str = "kmeans++",
                       preserve_sparsity: bool = False, iters: int = 30,
                       generator: torch.Generator | None = None) -> "ClusteredEmbedding":
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding, got {type(layer).__name__}")
        if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
            raise ValueError("ClusteredEmbedding supports plain lookups only, not max_norm, scale_grad_by_freq "
                             "or sparse gradients")
        centroids, indices, zero_index = fit_codebook(layer.weight, n_clusters, init, preserve_sparsity, iters,
                                                      generator)
        clustered = cls(layer.num_embeddings, layer.embedding_dim, n_clusters, layer.padding_idx, zero_index)
        clustered.set_codebook(centroids, indices)
        return clustered.to(layer.weight.device)

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.codebook()[self.indices[ids].long()]  # (..., C)
        if self.padding_idx is not None:  # as nn.Embedding: the padding row receives no gradient
            rows = torch.where((ids == self.padding_idx)[..., None], rows.detach(), rows)
        return rows

    def to_plain(self) -> nn.Embedding:
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            plain.weight.copy_(self.dequantize_weight())
        return plain.to(self.centroids.device)

    def layout(self) -> dict:
        return {"class": "ClusteredEmbedding", "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx, **super().layout()}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, n_clusters={self.n_clusters}, "
                f"padding_idx={self.padding_idx}, zero_index={self.zero_index}")


def cluster_weights(model: nn.Module, n_clusters: int = 16, init: str = "kmeans++", skip: Iterable[str] = (),
                    embeddings: bool = True, preserve_sparsity: bool = False, iters: int = 30,
                    generator: torch.Generator | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear (and nn.Embedding with `embeddings`) not named by `skip` by its clustered
    form, one k-means codebook per layer; return the model. Only centroids and biases remain trainable there.

    Args:
        n_clusters: k in [2, 256] (TF's number_of_clusters); indices are stored at 2, 4 or 8 bits.
        init: "linear" | "random" | "density" | "kmeans++", or TF's LINEAR / RANDOM / DENSITY_BASED /
            KMEANS_PLUS_PLUS.
        skip: module names, or dotted prefixes of them, to leave as they are (e.g. ["head"]).
        preserve_sparsity: exact zeros (pruned weights) keep a frozen zero centroid of their own.
    """
    check_n_clusters(n_clusters)
    init = resolve_init(init)
    options = dict(n_clusters=n_clusters, init=init, preserve_sparsity=preserve_sparsity, iters=iters,
                   generator=generator)
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    swaps = [(name, ClusteredLinear.from_linear(module, **options) if isinstance(module, nn.Linear)
              else ClusteredEmbedding.from_embedding(module, **options))
             for name, module in select_layers(model, kinds, skip, "cluster")]
    for name, layer in swaps:
        model.set_submodule(name, layer)
    return model


def strip_clustering(model: nn.Module) -> nn.Module:
    """Replace, in place, every clustered layer by the plain nn.Linear / nn.Embedding with weight c[a]."""
    swaps = [(name, m.to_plain()) for name, m in model.named_modules() if isinstance(m, ClusteredWeight)]
    for name, layer in swaps:
        if name:
            model.set_submodule(name, layer)
        else:
            return layer
    return model


def clustered_layers(model: nn.Module) -> dict[str, ClusteredWeight]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ClusteredWeight)}


def save_clustered(model: nn.Module, file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model's state_dict (clustered layers in packed form) to safetensors, their layout in the header."""
    layout = {name: m.layout() for name, m in clustered_layers(model).items()}
    write_safetensors(file, model.state_dict(), {**(metadata or {}), LAYOUT_KEY: json.dumps(layout)})


def load_clustered(model: nn.Module, file: str | Path) -> nn.Module:
    """Turn a float model of the saved architecture into the saved clustered one: swap in empty clustered layers
    as the header's layout says, then load every tensor (strict: a missing or unexpected name is an error)."""
    tensors, metadata = read_safetensors(file, with_metadata=True)
    if LAYOUT_KEY not in metadata:
        raise ValueError(f"{file} has no {LAYOUT_KEY!r} in its header: it was not written by save_clustered")
    for name, entry in json.loads(metadata[LAYOUT_KEY]).items():
        entry = dict(entry)
        kind = entry.pop("class")
        if kind == "ClusteredLinear":
            layer = ClusteredLinear(**entry)
        elif kind == "ClusteredEmbedding":
            layer = ClusteredEmbedding(**entry)
        else:
            raise ValueError(f"{file}: module {name!r} has an unknown clustered layer class {kind!r}")
        model.set_submodule(name, layer)
    model.load_state_dict(tensors, strict=True)
    return model



def pack_mask(mask: Tensor) -> Tensor:
    """Bool (n,) -> uint8 (ceil(n / 8),), eight flags per byte, the first in the high bit (like `pack`)."""
    flat = F.pad(mask.flatten().to(torch.int64), (0, -mask.numel() % 8)).reshape(-1, 8)  # (n_bytes, 8)
    shifts = torch.arange(7, -1, -1, device=mask.device)
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_mask`: the first `numel` flags, bool."""
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(numel / 8):
        raise ValueError(f"a mask of {numel} flags takes {math.ceil(numel / 8)} uint8 bytes, got "
                         f"{packed.numel()} of {packed.dtype}")
    shifts = torch.arange(7, -1, -1, device=packed.device)
    return ((packed.to(torch.int64)[:, None] >> shifts) & 1).flatten()[:numel].bool()


def check_n_clusters(n_clusters: int) -> None:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
        raise TypeError(f"n_clusters must be an int, got {type(n_clusters).__name__} {n_clusters!r}")
    if not 2 <= n_clusters <= MAX_CLUSTERS:
        raise ValueError(f"n_clusters must be in [2, {MAX_CLUSTERS}] (uint8 indices), got {n_clusters}")


def resolve_init(init: str) -> str:
    resolved = TF_INITS.get(init, init)
    if resolved not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS} or {tuple(TF_INITS)}")
    return resolved
