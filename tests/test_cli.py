"""End to end tests of VAE_TracIn_selfinf.py / VAE_TracIn_testinf.py, called in-process on tiny VAEs trained by
Beta_VAE/main.py on the shipped demo data (real MNIST digits and letters), CPU, seconds each."""
import json
import shutil

import numpy as np
import pytest
import torch
from torchvision.utils import save_image

import reports
import tracin_cli as cli
import tracin_utils as tu
import VAE_TracIn_selfinf as selfinf
import VAE_TracIn_testinf as testinf
from Beta_VAE import main as train
from Beta_VAE.dataset import build_dataset

Z = 16          # tiny latent: the MLP is 784-128-64-32-32
N_TRAIN = 1000  # first 1000 demo digits
R = 4           # reparameterisation draws in most runs: the code path is the one of 16


def train_model(root, data, dataset, extra=()):
    """Train a tiny beta-VAE with the project's trainer: checkpoints 100, 200, 300 in root/<network config>."""
    name = cli.network_config(dataset, 4, Z)
    train.main(["--dataset", dataset, "--seed", "1", "--optim", "sgd", "--lr", "1e-3", "--objective", "H",
                "--model", "MNIST", "--batch_size", "64", "--z_dim", str(Z), "--max_iter", "300", "--beta", "4",
                "--viz_on", "False", "--save_output", "False", "--viz_name", name, "--train_size", str(N_TRAIN),
                "--ckpt_every", "100", "--ckpt_dir", str(root), "--dset_dir", str(data), *extra])
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory, demo_data):
    return train_model(tmp_path_factory.mktemp("ckpt"), demo_data, "mnist")


def flags(root, out, data, dataset="mnist", *extra):
    return ["--beta", "4", "--latent_dim", str(Z), "--dataset", dataset, "--ckpt_root", str(root),
            "--output_root", str(out), "--dset_dir", str(data), "--reconstruct_num", str(R), *map(str, extra)]


@pytest.fixture(scope="module")
def selfinf_all(mnist_root, tmp_path_factory, demo_data):
    """Self influence over all checkpoints: (output root, returned dict)."""
    out = tmp_path_factory.mktemp("out")
    return out, selfinf.main(flags(mnist_root, out, demo_data))


# ------------------------------------------------------------------------------------------------ names
def test_beta_is_written_as_in_the_training_viz_name():
    assert cli.format_beta(4) == cli.format_beta(4.0) == "4"
    assert cli.format_beta(0.5) == "0.5"
    assert cli.network_config("mnist", 4.0, 128) == "mnist_beta4_z128_sgd"
    assert cli.network_config("cifar_zero", 2, 64) == "cifar_zero_beta2_z64_sgd"
    assert cli.result_stem(0, False) == "result" and cli.result_stem(2, True) == "result_last2_lastepoch"


# ----------------------------------------------------------------------------------------- self influence
def test_self_influence_writes_results_and_figures(selfinf_all):
    out, res = selfinf_all
    folder = out / "self_influence" / f"mnist_beta4_z{Z}_sgd"
    assert res["out_dir"] == folder and res["recomputed"] and res["n_train"] == N_TRAIN
    for name in ("result.pkl", "result.json", "high_selfinf_train_samples.jpg", "low_selfinf_train_samples.jpg",
                 "selfinf_byELBO.jpg", "selfinf_kde_byELBO.pdf"):
        assert (folder / name).stat().st_size > 0, name
    assert not (folder / "cache_result").exists()  # the per-checkpoint cache goes once the result is saved
    blob = torch.load(folder / "result.pkl", weights_only=True)
    infl = blob["influences"].numpy()
    assert infl.shape == (N_TRAIN,) and (infl > 0).all()
    assert blob["helpful"].tolist() == np.argsort(-infl, kind="stable").tolist()
    assert blob["harmful"].tolist() == np.argsort(infl, kind="stable").tolist()
    s = blob["settings"]
    assert s == json.loads((folder / "result.json").read_text())
    assert (s["dataset"], s["beta"], s["latent_dim"], s["loss"], s["reconstruct_num"], s["train_size"]) == \
        ("mnist", 4.0, Z, "train", R, N_TRAIN)
    assert [c["iteration"] for c in s["checkpoints"]] == [100, 200, 300]
    # w_c = lr * batch * gap / N, read from the checkpoints the trainer wrote.
    assert [c["weight"] for c in s["checkpoints"]] == pytest.approx([1e-3 * 64 * 100 / N_TRAIN] * 3)
    assert -1 <= res["r2"] <= 1


def test_last_epoch_uses_only_the_last_checkpoint(selfinf_all, mnist_root, demo_data):
    out, _ = selfinf_all
    res = selfinf.main(flags(mnist_root, out, demo_data, "mnist", "--last_epoch"))
    folder = res["out_dir"]
    assert res["result_file"].name == "result_lastepoch.pkl"
    last = torch.load(folder / "result_lastepoch.pkl", weights_only=True)
    full = torch.load(folder / "result.pkl", weights_only=True)
    assert last["settings"]["checkpoint_iterations"] == [300] and last["settings"]["last_epoch"]
    assert last["settings"]["checkpoints"][0]["weight"] == pytest.approx(1e-3 * 64 * 300 / N_TRAIN)
    assert not np.allclose(last["influences"].numpy(), full["influences"].numpy())


def test_resume_reuses_matching_results_and_recomputes_otherwise(selfinf_all, mnist_root, demo_data,
                                                                 monkeypatch, capsys):
    out, first = selfinf_all
    before = first["result_file"].read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although --resume had a matching result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tu, "self_influence", fail)
    again = selfinf.main(flags(mnist_root, out, demo_data, "mnist", "--resume"))
    assert not again["recomputed"] and "loaded scores from" in capsys.readouterr().out
    assert first["result_file"].read_bytes() == before

    # A failure while recomputing leaves the existing result whole.
    monkeypatch.setattr(tu, "self_influence", interrupted)
    with pytest.raises(SystemExit, match="130"):
        selfinf.main(flags(mnist_root, out, demo_data, "mnist", "--seed", "5"))
    assert first["result_file"].read_bytes() == before

    # Different settings: recomputed, saying why.
    monkeypatch.undo()
    changed = flags(mnist_root, out, demo_data, "mnist", "--resume")
    changed[changed.index("--reconstruct_num") + 1] = "2"
    res = selfinf.main(changed)
    assert res["recomputed"]
    assert "--resume: recomputing: settings differ (reconstruct_num: 4 -> 2)" in capsys.readouterr().out
    assert torch.load(res["result_file"], weights_only=True)["settings"]["reconstruct_num"] == 2


def test_data_cleaning_finds_the_letters(tmp_path, demo_data, capsys):
    root = train_model(tmp_path / "ckpt", demo_data, "mnist_emnist_extra", extra=("--extra_size", "50"))
    res = selfinf.main(flags(root, tmp_path / "out", demo_data, "mnist_emnist_extra"))
    printed = capsys.readouterr().out
    assert f"extra detection AUC (self-inf): {res['auc']:1.4f}" in printed
    assert "after checking 1% of the training data" in printed
    assert (res["out_dir"] / "AUC.png").stat().st_size > 0
    assert res["n_train"] == N_TRAIN + 50  # extra_size taken from the checkpoint's recorded config
    # The auc is the mean of the detection curve, exactly as the original's get_auc_score.
    helpful = torch.load(res["result_file"], weights_only=True)["helpful"].tolist()
    extras = set(range(N_TRAIN, N_TRAIN + 50))
    rates, found = [], 0
    for i in helpful:
        found += i in extras
        rates.append(found / 50)
    assert res["auc"] == pytest.approx(np.mean(rates), abs=1e-12)
    assert res["found"][0.10] == pytest.approx(rates[round(0.1 * len(rates)) - 1])
    assert res["auc"] > 0.8  # letters are out of distribution: high self influence


# ----------------------------------------------------------------------------------------- test influence
def test_sanity_check_each_training_sample_is_its_own_top_proponent(mnist_root, tmp_path, demo_data, capsys):
    res = testinf.main(flags(mnist_root, tmp_path, demo_data, "mnist", "--task", "train", "--test_num", "32"))
    printed = capsys.readouterr().out
    assert f"Top-1 Acc.: {res['top1']}" in printed
    assert res["top1"] >= 0.9 and res["mean_self_rank"] < 1
    folder = tmp_path / "train" / f"mnist_beta4_z{Z}_sgd"
    blob = torch.load(folder / "result.pkl", weights_only=True)
    assert blob["influences"].shape == (32, N_TRAIN) and blob["helpful"].shape == (32, N_TRAIN)
    assert blob["settings"]["task"] == "train"
    for name in ("proponents.jpg", "opponents.jpg", "test.jpg", "test/0.jpg", "test/31.jpg"):
        assert (folder / name).is_file(), name


def test_task_test_reads_jpgs_in_numeric_order(mnist_root, tmp_path, demo_data, caplog, capsys):
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    test = build_dataset("mnist", train=False, data_dir=demo_data)
    for i in (12, 3, 100, 0):
        save_image(test[i][0], jpgs / f"test_{i}.jpg")
    (jpgs / "notes.txt").write_text("not an image\n")
    with caplog.at_level("WARNING"):
        res = testinf.main(flags(mnist_root, tmp_path / "out", demo_data, "mnist", "--task", "test",
                                 "--load_from_jpg", "--load_from_jpg_dir", jpgs, "--n_display", 4))
    assert res["test_names"] == ["test_0.jpg", "test_3.jpg", "test_12.jpg", "test_100.jpg"]
    assert "skipping notes.txt: not an image file" in caplog.text
    printed = capsys.readouterr().out
    assert "strongest proponents with the test image's label" in printed
    assert 0 <= res["proponent_same_label"] <= 1 and 0 <= res["opponent_same_label"] <= 1
    for name in ("proponents.jpg", "opponents.jpg", "test.jpg", "traininf_distribution.pdf", "traininf_bydist.jpg"):
        assert (res["out_dir"] / name).stat().st_size > 0, name
    from PIL import Image
    with Image.open(res["out_dir"] / "proponents.jpg") as grid:  # 4 rows (test images) of 4 samples
        assert grid.size == (2 + 4 * 30, 2 + 4 * 30)
    with Image.open(res["out_dir"] / "proponents_opponents.jpg") as grid:  # test, blank, 4 proponents, blank, 4
        assert grid.size == (2 + 11 * 30, 2 + 4 * 30)
        pixels = np.asarray(grid.convert("L"), dtype=float)
    assert pixels[2:30, 32:60].min() > 250  # the blank after the test image is white
    # Row 0 starts with test_0.jpg (up to two JPEG round trips), not with the next test image.
    first = pixels[2:30, 2:30]
    assert np.abs(first - 255 * test[0][0][0].numpy()).mean() < 5 < np.abs(first - 255 * test[3][0][0].numpy()).mean()
    assert torch.load(res["result_file"], weights_only=True)["influences"].shape == (4, N_TRAIN)


def test_task_test_warns_of_images_without_a_label(mnist_root, tmp_path, demo_data, caplog, capsys):
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    test = build_dataset("mnist", train=False, data_dir=demo_data)
    save_image(test[1][0], jpgs / "test_1.jpg")
    save_image(test[2][0], jpgs / "test_99999.jpg")  # beyond the 500 demo test digits
    save_image(test[3][0], jpgs / "my_digit.jpg")    # no index at all
    with caplog.at_level("WARNING"):
        res = testinf.main(flags(mnist_root, tmp_path / "out", demo_data, "mnist", "--task", "test",
                                 "--load_from_jpg_dir", jpgs, "--n_display", 2))
    assert res["test_names"] == ["test_1.jpg", "test_99999.jpg", "my_digit.jpg"]
    assert "my_digit.jpg has no index in its name" in caplog.text
    assert "99999 beyond the 500 images of the mnist test split" in caplog.text
    # Only test_1.jpg has a label: the agreement is measured on it alone, and says so.
    assert res["proponent_same_label"] in (0.0, 1.0)
    assert "(of the 1 test images with a label)" in capsys.readouterr().out


def test_task_test_without_a_jpg_folder_says_which_flags(mnist_root, tmp_path, demo_data):
    with pytest.raises(SystemExit) as exc:
        testinf.main(flags(mnist_root, tmp_path / "out", demo_data, "mnist", "--task", "test"))
    message = str(exc.value.code)
    assert "--load_from_jpg --load_from_jpg_dir" in message and "\n" not in message


def test_task_gen_saves_generated_test_points(mnist_root, tmp_path, demo_data):
    res = testinf.main(flags(mnist_root, tmp_path, demo_data, "mnist", "--task", "gen", "--test_num", "3"))
    assert sorted(p.name for p in (res["out_dir"] / "test").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert torch.load(res["result_file"], weights_only=True)["influences"].shape == (3, N_TRAIN)


def test_cifar_family_data_cleaning_and_test_influence(tmp_path, shared_data):
    """The conv model on CIFAR (+ CelebA extras): AUC and grids, and --task test with RGB jpgs of any size."""
    root, out = tmp_path / "ckpt", tmp_path / "out"
    for dataset in ("cifar_celeba_extra", "cifar"):
        train.main(["--dataset", dataset, "--seed", "1", "--optim", "sgd", "--lr", "3e-4", "--model", "H",
                    "--batch_size", "16", "--z_dim", "8", "--max_iter", "20", "--beta", "2", "--viz_on", "False",
                    "--save_output", "False", "--viz_name", cli.network_config(dataset, 2, 8), "--train_size",
                    "150", "--extra_size", "10", "--ckpt_every", "10", "--ckpt_dir", str(root),
                    "--dset_dir", str(shared_data)])
    common = ["--beta", "2", "--latent_dim", "8", "--ckpt_root", str(root), "--output_root", str(out),
              "--dset_dir", str(shared_data), "--reconstruct_num", "2"]
    res = selfinf.main(common + ["--dataset", "cifar_celeba_extra"])
    assert res["n_train"] == 160 and 0 <= res["auc"] <= 1
    assert (res["out_dir"] / "AUC.png").is_file() and (res["out_dir"] / "high_selfinf_train_samples.jpg").is_file()

    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    test = build_dataset("cifar", train=False, data_dir=shared_data)
    save_image(test[4][0], jpgs / "test_4.jpg")                    # 64x64, as tools/export_test_images.py
    save_image(test[2][0][:, ::2, ::2], jpgs / "test_2.jpg")     # 32x32: resized to the model's 64x64
    res = testinf.main(common + ["--dataset", "cifar", "--task", "test", "--load_from_jpg_dir", str(jpgs)])
    assert res["test_names"] == ["test_2.jpg", "test_4.jpg"]
    for name in ("proponents.jpg", "opponents.jpg", "test.jpg", "traininf_bylatentnorm.jpg"):
        assert (res["out_dir"] / name).stat().st_size > 0, name
    assert not (res["out_dir"] / "traininf_distribution.pdf").exists()  # MNIST family only
    assert 0 <= res["proponent_same_label"] <= 1


# -------------------------------------------------------------------------------------------- bad input
def test_contradicting_latent_dim_is_a_one_line_error(mnist_root, tmp_path, demo_data):
    # The z16 checkpoints under the name a --latent_dim 32 run looks for.
    shutil.copytree(mnist_root / f"mnist_beta4_z{Z}_sgd", tmp_path / "mnist_beta4_z32_sgd")
    argv = flags(tmp_path, tmp_path / "out", demo_data)
    argv[argv.index("--latent_dim") + 1] = "32"
    with pytest.raises(SystemExit) as exc:
        selfinf.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"has z_dim {Z}, but --latent_dim is 32" in message


def test_missing_checkpoints_are_a_one_line_error(tmp_path, demo_data):
    with pytest.raises(SystemExit) as exc:
        testinf.main(flags(tmp_path, tmp_path / "out", demo_data, "mnist", "--task", "train"))
    message = str(exc.value.code)
    assert message.startswith("error: checkpoint folder") and "does not exist" in message and "\n" not in message


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_jpg_folder_is_a_one_line_error(mnist_root, tmp_path, demo_data, make):
    folder = tmp_path / "jpgs"
    if make == "empty":
        folder.mkdir()
        (folder / "readme.md").write_text("no images here")
    with pytest.raises(SystemExit) as exc:
        testinf.main(flags(mnist_root, tmp_path / "out", demo_data, "mnist", "--task", "test",
                           "--load_from_jpg_dir", folder))
    message = str(exc.value.code)
    assert message.startswith("error: --load_from_jpg_dir") and "\n" not in message


# ---------------------------------------------------------------------------------------------- reports
def test_detection_numbers_match_the_original_definition():
    order = np.array([7, 1, 9, 0, 2, 3, 4, 5, 6, 8])
    auc, rates = reports.get_auc_score(order, [9, 8])
    assert rates.tolist() == [0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert auc == pytest.approx(np.mean(rates))
    assert reports.found_after(rates, 0.3) == 0.5 and reports.found_after(rates, 0.01) == 0.0
    helpful = np.array([[0, 2, 1], [0, 1, 2]])
    assert reports.self_ranks(helpful, [0, 2]).tolist() == [0, 2]
    assert reports.normalize(np.array([-4.0, 2.0])).tolist() == [-1.0, 0.5]


def test_ctrl_c_is_one_line_and_keeps_finished_checkpoints(mnist_root, tmp_path, demo_data, monkeypatch, capsys,
                                                           caplog):
    """Interrupted after the first checkpoint: one line, exit 130; the rerun reuses that checkpoint's sums and
    gives the scores of an uninterrupted run."""
    out = tmp_path / "out"
    real = tu.load_tracin_checkpoint
    loaded = []

    def interrupt_at_the_second(*args, **kwargs):
        loaded.append(args[0])
        if len(loaded) == 3:  # the --ckpt_iter one, the first TracIn one, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tu, "load_tracin_checkpoint", interrupt_at_the_second)
    with pytest.raises(SystemExit) as exc:
        selfinf.main(flags(mnist_root, out, demo_data))
    assert exc.value.code == 130 and "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(tu, "load_tracin_checkpoint", real)
    with caplog.at_level("INFO"):
        again = selfinf.main(flags(mnist_root, out, demo_data))
    assert "checkpoint 100: reusing cached contribution" in caplog.text
    whole = selfinf.main(flags(mnist_root, tmp_path / "whole", demo_data))
    a = torch.load(again["result_file"], weights_only=True)["influences"]
    b = torch.load(whole["result_file"], weights_only=True)["influences"]
    assert torch.equal(a, b)
