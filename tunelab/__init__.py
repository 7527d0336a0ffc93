"""TuneLab: fine-tuning, taught by building every piece by hand in PyTorch."""

__version__ = "0.1.0"
