"""Where data, checkpoints and results live.

Everything resolves from this file's folder (the repository root), never from the working directory, so the
scripts behave the same whether they are run from the root or from ``Beta_VAE/``.

The data root holds torchvision's on-disk layouts::

    <data_root>/MNIST/raw/train-images-idx3-ubyte[.gz] ...
    <data_root>/EMNIST/raw/emnist-letters-train-images-idx3-ubyte[.gz] ...
    <data_root>/cifar-10-batches-py/data_batch_1 ... test_batch
    <data_root>/CelebA/img_align_celeba/000001.jpg ...

It is ``<repo>/data`` unless the environment variable ``VAE_TRACIN_DATA`` names another folder; a command-line
flag (``--dset_dir``) overrides both.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
DATA_ENV_VAR = "VAE_TRACIN_DATA"
# Set to 1 to forbid dataset downloads (the tests do): missing data is then an error naming the folder.
OFFLINE_ENV_VAR = "VAE_TRACIN_OFFLINE"

DEFAULT_DATA_ROOT = REPO_ROOT / "data"
DEMO_DATA_ROOT = REPO_ROOT / "demo" / "data"
CHECKPOINT_ROOT = REPO_ROOT / "Beta_VAE" / "checkpoints"
TRAIN_OUTPUT_ROOT = REPO_ROOT / "Beta_VAE" / "outputs"
OUTPUT_ROOT = REPO_ROOT / "output"


def data_root(override=None) -> Path:
    """The folder holding all datasets: ``override``, else ``$VAE_TRACIN_DATA``, else ``<repo>/data``."""
    if override:
        return Path(override).expanduser().resolve()
    from_env = os.environ.get(DATA_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser().resolve()
    return DEFAULT_DATA_ROOT


def downloads_allowed() -> bool:
    return os.environ.get(OFFLINE_ENV_VAR, "0") not in ("1", "true", "True", "yes")


def root_celeba(override=None) -> Path:
    """The folder that ``torchvision.datasets.ImageFolder`` reads CelebA from (it holds ``img_align_celeba/``)."""
    return data_root(override) / "CelebA"
