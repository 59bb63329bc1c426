"""The demo-scale data-cleaning experiment as a test (marked slow, a few minutes: run with pytest -m slow).

Trains the MNIST beta-VAE (z 128, beta 4, SGD lr 1e-4) on the shipped 5,000 digits + 100 letters for 3000
iterations, then checks that self influence finds the letters and that training samples are their own strongest
proponents. Measured: AUC 0.970, Top-1 1.0."""
import pytest

import tracin_cli as cli
import VAE_TracIn_selfinf as selfinf
import VAE_TracIn_testinf as testinf
from Beta_VAE import main as train

pytestmark = pytest.mark.slow


def test_demo_scale_data_cleaning_finds_the_letters(tmp_path, demo_data):
    name = cli.network_config("mnist_emnist_extra", 4, 128)
    train.main(["--dataset", "mnist_emnist_extra", "--seed", "1", "--optim", "sgd", "--lr", "1e-4", "--objective",
                "H", "--model", "MNIST", "--batch_size", "64", "--z_dim", "128", "--max_iter", "3000", "--beta", "4",
                "--viz_on", "False", "--save_output", "False", "--viz_name", name, "--extra_size", "100",
                "--ckpt_every", "500", "--ckpt_dir", str(tmp_path / "ckpt"), "--dset_dir", str(demo_data)])
    flags = ["--beta", "4", "--latent_dim", "128", "--dataset", "mnist_emnist_extra", "--ckpt_root",
             str(tmp_path / "ckpt"), "--output_root", str(tmp_path / "out"), "--dset_dir", str(demo_data)]
    cleaning = selfinf.main(flags)
    assert cleaning["n_train"] == 5100
    assert cleaning["auc"] >= 0.9
    assert cleaning["found"][0.05] >= 0.8
    sanity = testinf.main(flags + ["--task", "train", "--test_num", "32"])
    assert sanity["top1"] >= 0.9
