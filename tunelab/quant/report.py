"""How big a model is, whatever was done to it: parameters, stored bytes, bits per parameter, non-zeros.

A compressed module (quantized, clustered) reports itself through `size_info() -> {"params", "bytes",
"nonzeros"}`: the weights it stands for, the bytes it stores (codes, scales, codebooks, masks) and its non-zero
weights. Every other module is sized from its own parameters. A tensor shared by two modules (tied embeddings)
counts once. The reference size is float32: 4 bytes per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


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
