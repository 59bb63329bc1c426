"""The shipped demo data (demo/data), the shipped test images (output/images/test_mnist) and the export tool."""
import gzip
import re
import sys

import numpy as np
import pytest
import torch

import paths
from Beta_VAE.dataset import build_dataset, load_emnist_letters, read_idx

sys.path.insert(0, str(paths.REPO_ROOT / "demo"))
sys.path.insert(0, str(paths.REPO_ROOT / "tools"))
import export_test_images  # noqa: E402
import make_demo_data  # noqa: E402

SHIPPED_TEST_MNIST = paths.OUTPUT_ROOT / "images" / "test_mnist"


def test_demo_mnist_sizes(demo_data):
    train = build_dataset("mnist", train=True, data_dir=demo_data)
    test = build_dataset("mnist", train=False, data_dir=demo_data)
    assert (len(train), len(test)) == (5000, 500)
    assert train.image_shape == (1, 28, 28)
    assert set(train.labels.tolist()) == set(range(10))


def test_demo_mnist_emnist_extra(demo_data):
    data = build_dataset("mnist_emnist_extra", train=True, extra_size=100, data_dir=demo_data)
    assert len(data) == 5100 and data.n_base == 5000 and list(data.extra_indices) == list(range(5000, 5100))
    letters, letter_labels = load_emnist_letters(demo_data, train=True, download=False)
    images, labels = data.get_batch(torch.arange(5000, 5100))
    assert torch.equal(images, letters[:100].float() / 255)
    assert torch.equal(labels, letter_labels[:100])
    assert labels.min() >= 1 and labels.max() <= 26  # EMNIST letter labels (1 = A)
    digits = build_dataset("mnist", train=True, data_dir=demo_data)
    assert torch.equal(data.get_batch(torch.arange(5000))[0], digits.get_batch(torch.arange(5000))[0])


def test_demo_gz_files_are_reproducible(demo_data):
    for _, stem, _ in make_demo_data.DEMO_FILES:
        path = next(demo_data.rglob(stem + ".gz"))
        header = path.read_bytes()[:10]
        assert header[:3] == b"\x1f\x8b\x08" and header[4:8] == b"\0\0\0\0", f"{path}: gzip mtime is not 0"
        assert header[3] & 0x08 == 0, f"{path}: gzip header stores a file name"


@pytest.mark.parametrize("folder, stem, n", make_demo_data.DEMO_FILES)
def test_demo_records_equal_source(demo_data, shared_data, folder, stem, n):
    shipped = read_idx(demo_data / folder / (stem + ".gz"))
    source_path = shared_data / folder / stem
    source = read_idx(source_path if source_path.is_file() else source_path.with_name(stem + ".gz"))
    assert shipped.shape == (n,) + source.shape[1:]
    assert torch.equal(shipped, source[:n])


def test_make_demo_data_reproduces_shipped_files(demo_data, shared_data, tmp_path):
    make_demo_data.main(["--source", str(shared_data), "--out", str(tmp_path)])
    for folder, stem, _ in make_demo_data.DEMO_FILES:
        made, shipped = tmp_path / folder / (stem + ".gz"), demo_data / folder / (stem + ".gz")
        assert gzip.decompress(made.read_bytes()) == gzip.decompress(shipped.read_bytes()), stem


def _shipped_test_mnist():
    files = sorted(SHIPPED_TEST_MNIST.iterdir())
    return {int(re.fullmatch(r"test_(\d+)\.jpg", f.name).group(1)): f for f in files
            if re.fullmatch(r"test_(\d+)\.jpg", f.name)}, files


def test_shipped_test_mnist_names():
    by_index, files = _shipped_test_mnist()
    assert len(files) == 128 and len(by_index) == 128, [f.name for f in files if f.suffix != ".jpg"]
    assert all(0 <= i < 10000 for i in by_index)


def test_shipped_test_mnist_pixels(shared_data):
    from PIL import Image
    test = build_dataset("mnist", train=False, data_dir=shared_data)
    by_index, _ = _shipped_test_mnist()
    for index, path in sorted(by_index.items()):
        with Image.open(path) as img:
            assert img.size == (28, 28)
            pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255
        diff = np.abs(pixels - test[index][0][0].numpy()).mean()
        assert diff < 0.02, f"{path.name}: mean abs diff {diff:.4f} from MNIST test image {index}"


def test_export_writes_named_jpgs(demo_data, tmp_path):
    from PIL import Image
    out = export_test_images.main(["--dataset", "mnist", "--indices", "3", "12", "--out_dir", str(tmp_path),
                                   "--dset_dir", str(demo_data)])
    assert sorted(p.name for p in out.iterdir()) == ["test_12.jpg", "test_3.jpg"]  # no temporary files left
    test = build_dataset("mnist", train=False, data_dir=demo_data)
    with Image.open(tmp_path / "test_3.jpg") as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255
    assert np.abs(pixels - test[3][0][0].numpy()).mean() < 0.02


def test_export_ranges_and_first(demo_data, tmp_path):
    export_test_images.main(["--indices", "0-2", "7", "--out_dir", str(tmp_path / "a"), "--dset_dir", str(demo_data)])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test_0.jpg", "test_1.jpg", "test_2.jpg",
                                                                   "test_7.jpg"]
    export_test_images.main(["--first", "2", "--out_dir", str(tmp_path / "b"), "--dset_dir", str(demo_data)])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test_0.jpg", "test_1.jpg"]


@pytest.mark.parametrize("indices", [["500"], ["3", "-1"], ["7-2"], ["x"]])
def test_export_bad_index_names_the_flag(demo_data, tmp_path, indices):
    with pytest.raises(SystemExit) as excinfo:
        export_test_images.main(["--dataset", "mnist", "--indices", *indices, "--out_dir", str(tmp_path),
                                 "--dset_dir", str(demo_data)])
    message = str(excinfo.value.code)
    assert message.startswith("--indices:") and "\n" not in message
    if indices == ["500"]:
        assert "0-499" in message
    assert not any(tmp_path.iterdir()), "nothing is written when an index is bad"
