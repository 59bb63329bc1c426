"""Test set-up: the repository on sys.path, no downloads, data roots as fixtures."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Tests never download: missing data must be a clear error or a skip.
os.environ["VAE_TRACIN_OFFLINE"] = "1"

import paths  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The full offline datasets ($VAE_TRACIN_DATA, e.g. ../shared/data); tests using it skip without it."""
    root = os.environ.get(paths.DATA_ENV_VAR)
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip(f"${paths.DATA_ENV_VAR} does not point at a data folder with MNIST/raw (e.g. ../shared/data)")
    return Path(root).resolve()


@pytest.fixture(scope="session")
def demo_data():
    """The small real dataset shipped in the repository (always present)."""
    assert (paths.DEMO_DATA_ROOT / "MNIST" / "raw").is_dir(), f"missing shipped demo data {paths.DEMO_DATA_ROOT}"
    return paths.DEMO_DATA_ROOT
