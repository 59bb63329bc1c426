"""The one dataset builder: every dataset name of the project, from the on-disk layouts described in paths.py.

Every item is ``(image, label)`` with ``image`` a float32 tensor (C, H, W) in [0, 1] and ``label`` an int.
MNIST, EMNIST and CIFAR are read once into memory as uint8 tensors (no PIL decoding per step); ``get_batch``
gathers many items at once. In the ``*_extra`` datasets the base samples come first and the extra samples
after them, so the extras are indices ``n_base .. n_base + n_extra - 1``; extras keep their own labels
(EMNIST letters 1..26, CelebA faces 0).

Orientation: EMNIST's raw files store every letter transposed. We transpose them back on load, so the model
trains on upright letters and image grids need no special case. (The original code trained on the transposed
letters and transposed them only for display; either way the letters are out of distribution for MNIST.)
"""
import gzip
import logging
import pickle
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import paths

log = logging.getLogger(__name__)

CIFAR_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DATASETS = (("mnist", "mnist_emnist_extra", "cifar", "cifar_celeba_extra", "celeba")
            + tuple(f"cifar_{n}" for n in CIFAR_CLASSES))


class DataError(RuntimeError):
    """Missing or malformed dataset files; the message names the folder and the files expected."""


# ----------------------------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """Images held in memory, in one or more parts (base first, then extras).

    Each part is ``(images, labels)``: images uint8 (N, C, H, W) (scaled by 1/255 on access) or float32 in
    [0, 1]; labels int64 (N,).
    """

    def __init__(self, name, parts, n_extra=0):
        self.name = name
        self.parts = [(imgs, labels.long()) for imgs, labels in parts]
        shapes = {tuple(imgs.shape[1:]) for imgs, _ in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"{name}: parts have different image shapes {sorted(shapes)}")
        self.image_shape = shapes.pop()
        self.offsets = np.cumsum([0] + [len(imgs) for imgs, _ in self.parts])
        self.n_extra = n_extra
        self.n_base = len(self) - n_extra

    def __len__(self):
        return int(self.offsets[-1])

    @property
    def extra_indices(self):
        return range(self.n_base, len(self))

    @property
    def labels(self):
        return torch.cat([labels for _, labels in self.parts])

    @staticmethod
    def _as_float(imgs):
        return imgs.float().div_(255) if imgs.dtype == torch.uint8 else imgs.float()

    def __getitem__(self, index):
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of length {len(self)}")
        index %= len(self)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        imgs, labels = self.parts[part]
        local = index - int(self.offsets[part])
        return self._as_float(imgs[local]), int(labels[local])

    def get_batch(self, indices):
        """indices: sequence or int64 tensor (B,) -> (images float32 (B, C, H, W), labels int64 (B,))."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        images = torch.empty((len(indices),) + self.image_shape)
        labels = torch.empty(len(indices), dtype=torch.long)
        offsets = torch.as_tensor(self.offsets)
        part_of = torch.searchsorted(offsets, indices, right=True) - 1
        for part, (imgs, part_labels) in enumerate(self.parts):
            mask = part_of == part
            if mask.any():
                local = indices[mask] - int(self.offsets[part])
                images[mask] = self._as_float(imgs[local])
                labels[mask] = part_labels[local]
        return images, labels


class ImageFolderDataset(Dataset):
    """Images decoded from files on access (CelebA, too large to hold in memory). Label 0 for every image."""

    def __init__(self, name, files, image_size):
        self.name = name
        self.files = list(files)
        self.image_shape = (3, image_size, image_size)
        self.n_extra, self.n_base = 0, len(self.files)
        self.extra_indices = range(0)

    def __len__(self):
        return len(self.files)

    @property
    def labels(self):
        return torch.zeros(len(self), dtype=torch.long)

    def __getitem__(self, index):
        return _load_resized(self.files[index], self.image_shape[1:]), 0

    def get_batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        images = torch.stack([self[int(i)][0] for i in indices]) if len(indices) else \
            torch.empty((0,) + self.image_shape)
        return images, torch.zeros(len(indices), dtype=torch.long)


# ------------------------------------------------------------------------------------------- file readers
def _find(folder: Path, name: str) -> Path:
    """``folder/name`` or ``folder/name.gz``, or a DataError naming both."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing {folder / name} (or {name}.gz); see paths.py for the expected layout "
                    f"and set ${paths.DATA_ENV_VAR} or --dset_dir to the folder holding it")


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (MNIST's format), plain or gzipped, as a uint8 tensor of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or foreign .gz (an interrupted download)
        raise DataError(f"{path} cannot be read ({_reason(exc)}); delete it and download or copy it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return torch.from_numpy(body.reshape(dims).copy())


def _download_allowed(download):
    return paths.downloads_allowed() if download is None else download


def _reason(exc):
    """An exception as a short single line for an error message: 'Type: message' (at most about 200 characters)."""
    return f"{type(exc).__name__}: " + textwrap.shorten(" ".join(str(exc).split()), 200, placeholder=" ...")


def _download(fetch, folder, what):
    """Run ``fetch()`` (a torchvision downloader writing into ``folder``). A failure (no network, a bad mirror)
    is a DataError naming the folder; folders it created and left empty are removed again."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    log.info("missing %s in %s: downloading with torchvision", what, folder)
    try:
        fetch()
    except Exception as exc:  # URLError, RuntimeError, OSError, ... depending on where the download fails
        created = folder
        while created != existing:
            if created.is_dir() and not any(created.iterdir()):
                created.rmdir()
            created = created.parent
        raise DataError(f"missing {what} in {folder}, and downloading failed ({_reason(exc)}); put the files "
                        f"there, or set ${paths.DATA_ENV_VAR} or --dset_dir to a data "
                        f"folder holding them (set ${paths.OFFLINE_ENV_VAR}=1 to never download)") from None


def _load_idx_pair(folder, names, fetch, download):
    """(images, labels int64) from the IDX files ``names`` = (images, labels) in ``folder``; when they are missing
    and downloads are allowed, ``fetch()`` (torchvision's downloader) writes them there first."""
    if _download_allowed(download) and not all(_exists(folder, n) for n in names):
        _download(fetch, folder, " and ".join(names))
    return read_idx(_find(folder, names[0])), read_idx(_find(folder, names[1])).long()


def load_mnist(root: Path, train=True, download=None):
    """MNIST from ``root/MNIST/raw``. Returns images uint8 (N, 1, 28, 28), labels int64 (N,)."""
    import torchvision
    prefix = "train" if train else "t10k"
    images, labels = _load_idx_pair(
        Path(root) / "MNIST" / "raw", (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"),
        lambda: torchvision.datasets.MNIST(str(root), train=train, download=True), download)
    return images.unsqueeze(1), labels


def load_emnist_letters(root: Path, train=True, download=None):
    """EMNIST 'letters' from ``root/EMNIST/raw``, turned upright. Images uint8 (N, 1, 28, 28), labels 1..26."""
    import torchvision
    split = "train" if train else "test"
    images, labels = _load_idx_pair(
        Path(root) / "EMNIST" / "raw",
        (f"emnist-letters-{split}-images-idx3-ubyte", f"emnist-letters-{split}-labels-idx1-ubyte"),
        lambda: torchvision.datasets.EMNIST(str(root), split="letters", train=train, download=True), download)
    return images.transpose(1, 2).contiguous().unsqueeze(1), labels


def _exists(folder, name):
    return (folder / name).is_file() or (folder / (name + ".gz")).is_file()


def load_cifar10(root: Path, train=True, download=None):
    """CIFAR-10 from ``root/cifar-10-batches-py``. Returns images uint8 (N, 3, 32, 32), labels int64 (N,).

    Copies whose files differ from the official checksums (re-encoded or subset copies) load with a warning.
    """
    import torchvision
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / "cifar-10-batches-py"
    file_list = torchvision.datasets.CIFAR10.train_list if train else torchvision.datasets.CIFAR10.test_list
    if _download_allowed(download) and not all((folder / n).is_file() for n, _ in file_list):
        _download(lambda: torchvision.datasets.CIFAR10(str(root), train=train, download=True), folder, "CIFAR-10")
    images, labels, modified = [], [], []
    for name, md5 in file_list:
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing {path}; expected CIFAR-10's python batches "
                            f"({', '.join(n for n, _ in file_list)}) in {folder}; set ${paths.DATA_ENV_VAR} "
                            f"or --dset_dir to the folder holding cifar-10-batches-py/")
        if not check_integrity(str(path), md5):
            modified.append(name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except Exception as exc:  # truncated pickle, another file under that name, ...
            raise DataError(f"{path} is not a CIFAR-10 python batch ({_reason(exc)}); delete it and download or "
                            f"copy it again") from None
    if modified:
        warnings.warn(f"CIFAR-10 files in {folder} differ from the official checksums ({', '.join(modified)}): "
                      f"loading them as a modified copy", UserWarning, stacklevel=2)
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


def celeba_files(root: Path):
    """The CelebA image files under ``root/CelebA`` in file-name order (as torchvision's ImageFolder)."""
    folder = paths.root_celeba(root)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise DataError(f"no CelebA images found under {folder}; expected {folder}/img_align_celeba/000001.jpg "
                        f"... (CelebA cannot be downloaded automatically; see README)")
    return files


def _load_resized(path, size):
    from PIL import Image
    import torchvision.transforms.functional as TF
    with Image.open(path) as img:
        return TF.to_tensor(TF.resize(img.convert("RGB"), list(size)))


def min_max_scale(images):
    """Scale each image (B, C, H, W) to span [0, 1]. A constant image maps to zeros, never NaN."""
    flat = images.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.reshape(images.shape)


def resize_uint8(images, size, chunk=2048):
    """images uint8 (N, C, h, w) -> uint8 (N, C, size, size), bilinear with antialiasing."""
    import torchvision.transforms.v2.functional as F2
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.cat([F2.resize(images[i:i + chunk], [size, size], antialias=True)
                      for i in range(0, len(images), chunk)]) if len(images) else \
        images.new_empty((0, images.shape[1], size, size))


# ------------------------------------------------------------------------------------------- the builder
def dataset_spec(name: str) -> dict:
    """What a dataset name implies: base dataset, CIFAR class, extra source, channels, likelihood."""
    key = name.lower()
    if key not in DATASETS:
        raise DataError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    spec = {"name": key, "base": key.split("_")[0], "cifar_class": None, "extra": None}
    for label, word in enumerate(CIFAR_CLASSES):
        if key == f"cifar_{word}":
            spec["cifar_class"] = label
    if key == "mnist_emnist_extra":
        spec["extra"] = "emnist"
    if key == "cifar_celeba_extra":
        spec["extra"] = "celeba"
    spec["nc"] = 1 if spec["base"] == "mnist" else 3
    spec["likelihood"] = "bernoulli" if spec["base"] == "mnist" else "gaussian"
    return spec


def build_dataset(name, *, train=True, train_size=None, extra_size=1000, image_size=64, data_dir=None,
                  download=None):
    """Build dataset ``name`` (one of DATASETS).

    train: training split (with extras for ``*_extra``) or test split (base dataset only).
    train_size: keep only the first N samples of the base dataset (after class selection); None keeps all.
    extra_size: number of extra samples appended by the ``*_extra`` datasets.
    image_size: side of CIFAR / CelebA images (MNIST and EMNIST stay 28x28).
    data_dir: data root, overriding paths.data_root(); download: None follows $VAE_TRACIN_OFFLINE.
    """
    spec = dataset_spec(name)
    root = paths.data_root(data_dir)
    if train_size is not None and train_size <= 0:
        raise DataError(f"--train_size must be positive; got {train_size}")
    if spec["base"] == "celeba":
        files = celeba_files(root)[:train_size]
        return ImageFolderDataset(spec["name"], files, image_size)

    if spec["base"] == "mnist":
        images, labels = load_mnist(root, train=train, download=download)
    else:
        images, labels = load_cifar10(root, train=train, download=download)
        if spec["cifar_class"] is not None:
            keep = labels == spec["cifar_class"]
            images, labels = images[keep], labels[keep]
    if train_size is not None:
        images, labels = images[:train_size], labels[:train_size]
    if spec["base"] == "cifar":
        images = resize_uint8(images, image_size)
    parts = [(images, labels)]

    n_extra = 0
    if train and spec["extra"] is not None and extra_size > 0:
        if spec["extra"] == "emnist":
            letters, letter_labels = load_emnist_letters(root, train=True, download=download)
            extra = (letters[:extra_size], letter_labels[:extra_size])
        else:
            files = celeba_files(root)[:extra_size]
            faces = torch.stack([_load_resized(f, (image_size, image_size)) for f in files])
            extra = (min_max_scale(faces), torch.zeros(len(files), dtype=torch.long))
        if len(extra[0]) < extra_size:
            raise DataError(f"--extra_size {extra_size} asks for more {spec['extra']} images than the "
                            f"{len(extra[0])} found under {root}")
        parts.append(extra)
        n_extra = extra_size
    return ImageDataset(spec["name"], parts, n_extra=n_extra)
