"""Every dataset name of the project, built from the offline real data ($VAE_TRACIN_DATA)."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from Beta_VAE.dataset import (CIFAR_CLASSES, DATASETS, DataError, ImageDataset, ImageFolderDataset, build_dataset,
                              dataset_spec, min_max_scale)


def _raw_idx(path):
    """An IDX file read independently of the project's reader: uint8 array of its stored shape."""
    raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _raw_cifar_labels(root, names):
    labels = []
    for name in names:
        with open(root / "cifar-10-batches-py" / name, "rb") as f:
            labels += pickle.load(f, encoding="latin1")["labels"]
    return np.array(labels)


TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _check_images(ds, shape, n_sample=256):
    """Shape, dtype and [0, 1] range on a random sample of items; returns the sample (images, labels)."""
    assert tuple(ds.image_shape) == shape
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n_sample]
    images, labels = ds.get_batch(idx)
    assert images.shape == (len(idx),) + shape
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    return images, labels


@pytest.fixture(scope="module")
def cifar(shared_data):
    with pytest.warns(UserWarning, match="differ from the official checksums"):
        return build_dataset("cifar", data_dir=shared_data)


def test_mnist(shared_data):
    ds = build_dataset("mnist", data_dir=shared_data)
    assert isinstance(ds, ImageDataset)
    assert len(ds) == 60000 and ds.n_base == 60000 and ds.n_extra == 0
    images, _ = _check_images(ds, (1, 28, 28))
    assert images.min() == 0 and images.max() == 1  # uint8 0..255 scaled by 1/255
    raw_labels = _raw_idx(shared_data / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    assert torch.equal(ds.labels, torch.from_numpy(raw_labels.astype(np.int64)))
    raw_images = _raw_idx(shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte")
    image, label = ds[123]
    assert torch.equal(image[0], torch.from_numpy(raw_images[123].astype(np.float32)) / 255)
    assert label == int(raw_labels[123])
    assert len(build_dataset("mnist", train=False, data_dir=shared_data)) == 10000
    assert len(build_dataset("mnist", train_size=1000, data_dir=shared_data)) == 1000


def test_cifar(shared_data, cifar):
    assert len(cifar) == 5000 and cifar.n_extra == 0
    _check_images(cifar, (3, 64, 64))
    raw_labels = _raw_cifar_labels(shared_data, TRAIN_BATCHES)
    assert torch.equal(cifar.labels, torch.from_numpy(raw_labels))
    assert set(cifar.labels.tolist()) == set(range(10))
    with pytest.warns(UserWarning):
        test = build_dataset("cifar", train=False, data_dir=shared_data)
    assert len(test) == 2000


@pytest.mark.parametrize("label,word", list(enumerate(CIFAR_CLASSES)))
def test_cifar_classes(shared_data, label, word):
    with pytest.warns(UserWarning):
        ds = build_dataset(f"cifar_{word}", data_dir=shared_data)
    expected = int((_raw_cifar_labels(shared_data, TRAIN_BATCHES) == label).sum())
    assert len(ds) == expected
    assert set(ds.labels.tolist()) == {label}
    if word == "zero":
        assert len(ds) == 508  # the airplanes of the 10% subset (README)
        _check_images(ds, (3, 64, 64))
        with pytest.warns(UserWarning):
            test = build_dataset("cifar_zero", train=False, data_dir=shared_data)
        assert len(test) == int((_raw_cifar_labels(shared_data, ["test_batch"]) == 0).sum())
        assert set(test.labels.tolist()) == {0}


def test_cifar_class_matches_full_cifar(shared_data, cifar):
    """cifar_three is exactly the class-3 images of cifar, in the same order."""
    with pytest.warns(UserWarning):
        three = build_dataset("cifar_three", data_dir=shared_data)
    where = torch.nonzero(cifar.labels == 3).flatten()
    assert torch.equal(three.get_batch(torch.arange(5))[0], cifar.get_batch(where[:5])[0])


def test_mnist_emnist_extra(shared_data):
    ds = build_dataset("mnist_emnist_extra", train_size=2000, extra_size=100, data_dir=shared_data)
    assert len(ds) == 2100 and ds.n_base == 2000 and ds.n_extra == 100
    assert list(ds.extra_indices) == list(range(2000, 2100))
    _check_images(ds, (1, 28, 28))
    labels = ds.labels
    assert labels[:2000].max() <= 9
    raw_letters = _raw_idx(shared_data / "EMNIST" / "raw" / "emnist-letters-train-images-idx3-ubyte")
    raw_letter_labels = _raw_idx(shared_data / "EMNIST" / "raw" / "emnist-letters-train-labels-idx1-ubyte")
    assert torch.equal(labels[2000:], torch.from_numpy(raw_letter_labels[:100].astype(np.int64)))
    image, label = ds[2000]
    assert 1 <= label <= 26
    # Upright: the raw file stores letters transposed.
    upright = torch.from_numpy(raw_letters[0].T.astype(np.float32)) / 255
    assert torch.equal(image[0], upright)
    assert not torch.equal(image[0], upright.T)
    for k in (17, 99):
        assert torch.equal(ds[2000 + k][0][0], torch.from_numpy(raw_letters[k].T.astype(np.float32)) / 255)
    # The base part is MNIST unchanged.
    mnist = build_dataset("mnist", train_size=2000, data_dir=shared_data)
    assert torch.equal(ds.get_batch(torch.arange(2000))[0], mnist.get_batch(torch.arange(2000))[0])
    # The test split holds no extras.
    test = build_dataset("mnist_emnist_extra", train=False, extra_size=100, data_dir=shared_data)
    assert len(test) == 10000 and test.n_extra == 0


def test_cifar_celeba_extra(shared_data):
    with pytest.warns(UserWarning):
        ds = build_dataset("cifar_celeba_extra", train_size=300, extra_size=20, data_dir=shared_data)
    assert len(ds) == 320 and ds.n_base == 300 and ds.n_extra == 20
    _check_images(ds, (3, 64, 64), n_sample=320)
    assert ds.labels[300:].tolist() == [0] * 20
    assert ds.labels[:300].max() <= 9
    extras = ds.get_batch(torch.arange(300, 320))[0]
    flat = extras.flatten(1)
    assert torch.equal(flat.min(1).values, torch.zeros(20))  # min-max scaled: each spans exactly [0, 1]
    assert torch.equal(flat.max(1).values, torch.ones(20))
    with pytest.warns(UserWarning):
        test = build_dataset("cifar_celeba_extra", train=False, extra_size=20, data_dir=shared_data)
    assert len(test) == 2000 and test.n_extra == 0


def test_celeba(shared_data):
    ds = build_dataset("celeba", data_dir=shared_data)
    assert isinstance(ds, ImageFolderDataset)
    assert len(ds) == 2000
    assert ds.files[0].name == "000001.jpg" and ds.files[-1].name == "002000.jpg"
    images, labels = _check_images(ds, (3, 64, 64), n_sample=8)
    assert labels.tolist() == [0] * 8
    assert len(build_dataset("celeba", train_size=50, image_size=32, data_dir=shared_data)) == 50
    assert build_dataset("celeba", train_size=2, image_size=32, data_dir=shared_data)[1][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["mnist_emnist_extra", "celeba"])
def test_get_batch_equals_stacked_items(shared_data, name):
    ds = build_dataset(name, train_size=50, extra_size=10, data_dir=shared_data)
    idx = [0, 7, 49, 3] + ([50, 59, 52] if name.endswith("extra") else [])
    images, labels = ds.get_batch(idx)
    assert torch.equal(images, torch.stack([ds[i][0] for i in idx]))
    assert labels.tolist() == [ds[i][1] for i in idx]
    assert ds.get_batch([])[0].shape == (0,) + tuple(ds.image_shape)


def test_min_max_scale():
    constant = torch.full((2, 3, 4, 4), 0.7)
    scaled = min_max_scale(constant)
    assert torch.equal(scaled, torch.zeros_like(constant))  # no 0/0
    ramp = torch.linspace(0.2, 0.6, 48).reshape(1, 3, 4, 4)
    scaled = min_max_scale(ramp)
    assert scaled.min() == 0 and scaled.max() == 1
    assert torch.allclose(scaled.flatten(), torch.linspace(0, 1, 48), atol=1e-6)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("mnist_emnist_extra", "MNIST/raw"),
                                         ("cifar", "cifar-10-batches-py"), ("celeba", "CelebA")])
def test_missing_data_folder_names_it(tmp_path, name, folder):
    root = tmp_path / "no_data_here"
    with pytest.raises(DataError, match="no_data_here") as info:
        build_dataset(name, data_dir=root)
    assert str(root / folder) in str(info.value)


def test_missing_extra_folder_names_it(shared_data, tmp_path):
    """MNIST present but EMNIST missing: the error names the EMNIST folder."""
    (tmp_path / "MNIST").symlink_to(shared_data / "MNIST")
    with pytest.raises(DataError) as info:
        build_dataset("mnist_emnist_extra", train_size=10, extra_size=5, data_dir=tmp_path)
    assert str(tmp_path / "EMNIST" / "raw") in str(info.value)


def test_modified_cifar_copy_loads_with_warning(shared_data, tmp_path):
    """A CIFAR-10 copy whose files differ from the official ones (here: 10 images per batch) loads, warning."""
    source, copy = shared_data / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"
    copy.mkdir()
    for name in TRAIN_BATCHES + ["test_batch"]:
        with open(source / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        small = {"data": entry["data"][:10], "labels": entry["labels"][:10], "batch_label": entry["batch_label"]}
        with open(copy / name, "wb") as f:
            pickle.dump(small, f)
    shutil.copy(source / "batches.meta", copy / "batches.meta")
    with pytest.warns(UserWarning, match="differ from the official checksums") as record:
        ds = build_dataset("cifar", image_size=32, data_dir=tmp_path)
    assert str(copy) in str(record[0].message)
    assert len(ds) == 50
    with open(source / "data_batch_2", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    expected = torch.from_numpy(np.asarray(entry["data"][3], dtype=np.float32).reshape(3, 32, 32)) / 255
    assert torch.equal(ds[13][0], expected) and ds[13][1] == entry["labels"][3]


def test_bad_dataset_name():
    with pytest.raises(DataError, match="--dataset must be one of") as info:
        dataset_spec("svhn")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(DataError, match="svhn"):
        build_dataset("svhn")
    assert dataset_spec("CelebA")["name"] == "celeba"  # names are case-insensitive
    assert dataset_spec("MNIST_EMNIST_extra")["extra"] == "emnist"


def test_dataset_spec_layout():
    assert dataset_spec("mnist")["nc"] == 1 and dataset_spec("mnist")["likelihood"] == "bernoulli"
    assert dataset_spec("cifar_nine")["cifar_class"] == 9 and dataset_spec("cifar_nine")["nc"] == 3
    assert dataset_spec("cifar_celeba_extra")["likelihood"] == "gaussian"
    assert dataset_spec("cifar_celeba_extra")["extra"] == "celeba"


@pytest.mark.parametrize("name,folder,downloader", [("mnist", "MNIST", "MNIST"),
                                                    ("mnist_emnist_extra", "EMNIST", "EMNIST")])
def test_missing_files_are_downloaded_only_when_allowed(demo_data, tmp_path, monkeypatch, name, folder,
                                                        downloader):
    """With downloads allowed, missing IDX files are fetched by torchvision's downloader into the data root (here
    a fake that copies the demo files: nothing leaves the machine); offline, it is never called."""
    import torchvision
    root = tmp_path / "root"
    root.mkdir()
    if folder == "EMNIST":
        (root / "MNIST").symlink_to(demo_data / "MNIST")
    calls = []

    def fake_download(target, download, **kwargs):
        calls.append((target, download))
        shutil.copytree(demo_data / folder, root / folder, dirs_exist_ok=True)

    monkeypatch.setattr(torchvision.datasets, downloader, fake_download)
    with pytest.raises(DataError, match=folder):
        build_dataset(name, train_size=10, extra_size=5, data_dir=root, download=False)
    assert calls == []
    ds = build_dataset(name, train_size=10, extra_size=5, data_dir=root, download=True)
    assert calls == [(str(root), True)]
    assert len(ds) == (15 if folder == "EMNIST" else 10)
    build_dataset(name, train_size=10, extra_size=5, data_dir=root, download=True)
    assert len(calls) == 1  # present now: no second download


@pytest.mark.parametrize("name,downloader,folder", [("mnist", "MNIST", "MNIST/raw"),
                                                    ("cifar", "CIFAR10", "cifar-10-batches-py")])
def test_failed_download_is_one_clear_error_and_leaves_no_empty_folders(tmp_path, monkeypatch, name, downloader,
                                                                        folder):
    import urllib.error
    import torchvision
    root = tmp_path / "new" / "data"

    def failing_download(target, **kwargs):
        (Path(target) / folder).mkdir(parents=True)  # as torchvision does before fetching
        raise urllib.error.URLError("Name or service not known")

    real = getattr(torchvision.datasets, downloader)
    for attr in ("train_list", "test_list"):  # the loader reads CIFAR-10's file list from the class
        if hasattr(real, attr):
            setattr(failing_download, attr, getattr(real, attr))
    monkeypatch.setattr(torchvision.datasets, downloader, failing_download)
    with pytest.raises(DataError, match="downloading failed .URLError") as info:
        build_dataset(name, data_dir=root, download=True)
    assert str(root / folder) in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_truncated_data_file_is_one_clear_error(shared_data, tmp_path, name):
    """A partial download: the first half of a file. One DataError line naming the file."""
    if name == "mnist":
        (tmp_path / "MNIST" / "raw").mkdir(parents=True)
        source = shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
        import gzip
        bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(source.read_bytes()[:100000])[:20000])
        shutil.copy(shared_data / "MNIST" / "raw" / "train-labels-idx1-ubyte", tmp_path / "MNIST" / "raw")
    else:
        shutil.copytree(shared_data / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
        bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
        bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(DataError) as info:
        build_dataset(name, data_dir=tmp_path, download=False)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
