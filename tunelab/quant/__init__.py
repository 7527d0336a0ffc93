"""Quantization, pruning and weight clustering."""
