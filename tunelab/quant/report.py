"""How big a model is, whatever was done to it: parameters, stored bytes, bits per parameter, non-zeros.

A compressed module (quantized, clustered) reports itself through `size_info() -> {"params", "bytes",
"nonzeros"}`: the weights it stands for, the bytes it stores (codes, scales, codebooks, masks) and its non-zero
weights. Every other module is sized from its own parameters. A tensor shared by two modules (tied embeddings)
counts once. The reference size is float32: 4 bytes per parameter.

`training_memory` adds what training costs on top of the weights: gradients, optimizer state and the
activations kept for the backward pass (measured), as in QLoRA's accounting (Dettmers et al. 2023, sec. 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class SizeRow:
    """One module (or a group of plain parameters) of the report."""

    name: str
    kind: str
    params: int
    bytes: int
    nonzeros: int
    sparse_bytes: int | None = None  # stored as a 1-bit mask + the non-zero values, where that is smaller

    def __post_init__(self):
        if self.sparse_bytes is None:
            self.sparse_bytes = self.bytes

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class SizeReport:
    """Rows per module and the totals; `ratio` is float32 size / stored size."""

    rows: list[SizeRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def nonzeros(self) -> int:
        return sum(r.nonzeros for r in self.rows)

    @property
    def sparse_bytes(self) -> int:
        """The bytes with every float tensor that is mostly zeros stored as a bitmask + its non-zeros."""
        return sum(r.sparse_bytes for r in self.rows)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def ratio(self) -> float:
        """How many times smaller than the same parameters in float32."""
        return 4 * self.params / self.bytes if self.bytes else float("inf")

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzeros / self.params if self.params else 0.0

    def by_kind(self) -> dict[str, SizeRow]:
        """The rows summed per kind of layer ("Linear", "Int8Linear", "float params" ...)."""
        kinds: dict[str, SizeRow] = {}
        for r in self.rows:
            k = kinds.setdefault(r.kind, SizeRow(r.kind, r.kind, 0, 0, 0))
            k.params, k.bytes, k.nonzeros = k.params + r.params, k.bytes + r.bytes, k.nonzeros + r.nonzeros
            k.sparse_bytes += r.sparse_bytes
        return kinds

    def table(self, per_module: bool = False) -> str:
        """A text table, one line per kind of layer (or per module), and the total."""
        rows = self.rows if per_module else list(self.by_kind().values())
        width = max([len(r.name) for r in rows] + [12])
        lines = [f"{'':{width}}  {'params':>12}  {'bytes':>12}  {'bits/param':>10}  {'non-zero':>8}"]
        for r in rows + [SizeRow("total", "", self.params, self.bytes, self.nonzeros, self.sparse_bytes)]:
            share = r.nonzeros / r.params if r.params else 0.0
            lines.append(f"{r.name:{width}}  {r.params:>12,}  {r.bytes:>12,}  {r.bits_per_param:>10.3f}  {share:>8.1%}")
        lines.append(f"{self.ratio:.2f}x smaller than float32 ({4 * self.params:,} bytes)")
        return "\n".join(lines)


def size_report(model: nn.Module) -> SizeReport:
    """Size every module of `model`: compressed modules through their `size_info`, the rest from their parameters
    (and persistent buffers that are not pruning masks), each distinct tensor counted once."""
    report, seen = SizeReport(), set()
    compressed = []

    def visit(module: nn.Module, name: str) -> None:
        if hasattr(module, "size_info"):
            info = module.size_info()
            report.rows.append(SizeRow(name or "model", type(module).__name__, info["params"], info["bytes"],
                                       info["nonzeros"]))
            compressed.append(module)
            seen.update(id(p) for p in module.parameters())
            return
        params = bytes_ = nonzeros = sparse = 0
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n, nnz = p.numel(), int(p.count_nonzero())
            params, bytes_, nonzeros = params + n, bytes_ + n * p.element_size(), nonzeros + nnz
            sparse += min(n * p.element_size(), -(-n // 8) + nnz * p.element_size())
        if params:
            report.rows.append(SizeRow(name or "model", type(module).__name__, params, bytes_, nonzeros, sparse))
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return report


@dataclass
class TrainingMemory:
    """Where the memory of one training step goes, in bytes: the frozen weights as stored, the trained weights,
    their gradients, the optimizer's state, and the activations autograd keeps for the backward pass."""

    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {"frozen": self.frozen, "trainable": self.trainable, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total}


def training_memory(model: nn.Module, loss_fn: Callable[[], Tensor], optimizer_states: int = 2) -> TrainingMemory:
    """Account for one training step of `model`: `loss_fn()` runs its forward pass (and returns the loss, which
    is not differentiated here).

    Weights are sized as stored (parameters and buffers: 4-bit codes count 4 bits); gradients as the trained tensors;
    the optimizer as `optimizer_states` float32 values per trained parameter (AdamW: 2, its two moments). The
    activations are measured: every tensor autograd saves for the backward pass during `loss_fn()`, counted
    once per storage, leaving out the model's own parameters and buffers. A 4-bit layer that decoded its weight
    into a float tensor for the backward pass would show here; one that decodes it again in the backward
    (`DequantizedMatmul`) does not. Under gradient checkpointing the recomputed blocks hide what they save, so
    the figure is then a lower bound: add each block's input. On the meta device (a model built with
    `torch.device("meta")`, no weights) the same accounting runs on shapes alone.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() * p.element_size() for p in trained)
    stored = {_storage(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[tuple, int] = {}
    held = []  # on the meta device tensors are told apart by id: keep them alive so that no id is reused

    def pack(t: Tensor) -> Tensor:
        key = _storage(t)
        if key not in stored:
            held.append(t)
            saved[key] = max(saved.get(key, 0), _nbytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    tensors = {_storage(t): _nbytes(t) for t in [*model.parameters(), *model.buffers()]}  # shared ones once
    return TrainingMemory(frozen=sum(tensors.values()) - trainable, trainable=trainable, gradients=trainable,
                          optimizer=optimizer_states * 4 * sum(p.numel() for p in trained),
                          activations=sum(saved.values()))


def _storage(t: Tensor) -> tuple:
    """What identifies the memory of `t`: its storage's address; on the meta device (shapes only, no memory),
    the tensor it is a view of."""
    if t.is_meta:
        return (t.device, id(t if t._base is None else t._base))
    return (t.device, t.untyped_storage().data_ptr())


def _nbytes(t: Tensor) -> int:
    base = t if t._base is None else t._base
    return base.numel() * base.element_size() if t.is_meta else t.untyped_storage().nbytes()
