"""The training command line end to end at toy size: checkpoints, resume, divergence, traversals, errors."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import paths
from Beta_VAE import main as main_module
from Beta_VAE.checkpoint import load_checkpoint, load_model
from Beta_VAE.main import build_parser, main
from Beta_VAE.model import BetaVAE_MNIST

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_KEYS = {"iter", "win_states", "model_states", "optim_states"}
CONFIG_KEYS = {"dataset", "train_size", "extra_size", "model", "objective", "z_dim", "nc", "beta", "gamma", "C_max",
               "C_stop_iter", "likelihood", "optimizer", "lr", "batch_size", "seed", "image_size"}


@pytest.fixture(autouse=True)
def one_thread():
    # Toy networks: thread start-up costs more than it saves, and shared CI machines oversubscribe badly.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run(demo_data, tmp_path):
    """main() on a small MNIST run (shipped demo digits) writing under tmp_path; extra flags override the defaults."""
    def _run(*flags, name="run"):
        base = ["--dataset", "mnist", "--model", "MNIST", "--train_size", "1000", "--z_dim", "8",
                "--batch_size", "32", "--cuda", "False", "--viz_on", "False", "--save_output", "False",
                "--dset_dir", str(demo_data), "--ckpt_dir", str(tmp_path / "ck"),
                "--output_dir", str(tmp_path / "out"), "--viz_name", name]
        return main(base + [str(f) for f in flags])
    return _run


def _finite(path):
    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["model_states"]["net"].values())


def test_training_checkpoints_and_loss_goes_down(run, tmp_path):
    solver = run("--max_iter", 300, "--ckpt_every", 100)
    folder = tmp_path / "ck" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["100", "200", "300", "last"]
    assert solver.global_iter == 300 and len(solver.history["loss"]) == 300
    early, late = solver.mean_loss(0, 50), solver.mean_loss(-50)
    assert late < 0.9 * early, (early, late)

    for name, it in (("100", 100), ("200", 200), ("300", 300), ("last", 300)):
        state = load_checkpoint(folder / name)
        assert ORIGINAL_KEYS | {"config"} == set(state)
        assert state["iter"] == it
        assert set(state["win_states"]) == {"recon", "kld", "mu", "var"}
        assert set(state["optim_states"]) == {"optim"} and set(state["model_states"]) == {"net"}
    config = load_checkpoint(folder / "last")["config"]
    assert CONFIG_KEYS <= set(config)
    assert {k: config[k] for k in ("dataset", "train_size", "extra_size", "model", "objective", "z_dim", "nc",
                                   "likelihood", "optimizer", "lr", "batch_size", "seed", "beta", "image_size")} == \
        {"dataset": "mnist", "train_size": 1000, "extra_size": 0, "model": "MNIST", "objective": "H", "z_dim": 8,
         "nc": 1, "likelihood": "bernoulli", "optimizer": "adam", "lr": 1e-4, "batch_size": 32, "seed": 1,
         "beta": 4.0, "image_size": 28}

    # The config alone rebuilds the network: same weights as the trained one.
    net, state = load_model(folder / "last")
    for key, value in solver.net.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert torch.equal(load_checkpoint(folder / "300")["model_states"]["net"]["encoder.1.weight"],
                       state["model_states"]["net"]["encoder.1.weight"])


def test_resume_continues_iterations_and_optimizer(run, tmp_path, caplog):
    first = run("--max_iter", 60, "--save_step", 30, "--ckpt_every", 0)
    assert first.optim.state_dict()["state"][0]["step"].item() == 60
    last = tmp_path / "ck" / "run" / "last"
    saved = load_checkpoint(last)

    # A finished run says so and returns without training or rewriting anything.
    mtime = last.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        done = run("--max_iter", "60")
    assert "already finished" in caplog.text
    assert done.global_iter == 60 and len(done.history["loss"]) == 0
    assert last.stat().st_mtime_ns == mtime
    # ... and it did restore the optimizer state (Adam moments) exactly.
    for p_id, p_state in saved["optim_states"]["optim"]["state"].items():
        assert torch.equal(done.optim.state_dict()["state"][p_id]["exp_avg"], p_state["exp_avg"])

    resumed = run("--max_iter", "1e2", "--save_step", 30, "--ckpt_every", 0)
    assert resumed.history_start == 60 and resumed.global_iter == 100
    assert len(resumed.history["loss"]) == 40
    assert load_checkpoint(last)["iter"] == 100
    # Adam's step count continues from the checkpoint (60 + 40), not from a fresh optimizer (40).
    assert resumed.optim.state_dict()["state"][0]["step"].item() == 100
    # The resumed run does not start from scratch: its first losses are about where the first run ended.
    assert resumed.mean_loss(0, 10) < first.mean_loss(0, 10)


def test_resume_with_other_architecture_is_a_clear_error(run):
    run("--max_iter", 5)
    with pytest.raises(SystemExit, match="z_dim=8.*z_dim=16"):
        run("--max_iter", 10, "--z_dim", 16)


@pytest.mark.parametrize("flag,value,words", [("--beta", 2, "beta=4.0.*beta=2.0"),
                                              ("--train_size", 500, "train_size=1000.*train_size=500"),
                                              ("--objective", "B", "objective='H'.*objective='B'")])
def test_resume_with_other_objective_or_data_is_a_clear_error(run, tmp_path, flag, value, words):
    """Every checkpoint of a run folder must answer to the same TracIn flags: no silent change of beta or data."""
    run("--max_iter", 5, "--ckpt_every", 5)
    with pytest.raises(SystemExit, match=words):
        run("--max_iter", 10, "--ckpt_every", 5, flag, value)
    assert sorted(p.name for p in (tmp_path / "ck" / "run").iterdir()) == ["5", "last"]


def test_ctrl_c_during_a_numbered_save_still_saves_last(run, tmp_path, monkeypatch):
    import signal
    import Beta_VAE.solver as solver_module
    real_save = solver_module.Solver.save

    def save_with_ctrl_c(self, name, *args):
        real_save(self, name, *args)
        if name == "10":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(solver_module.Solver, "save", save_with_ctrl_c)
    with pytest.raises(SystemExit):
        run("--max_iter", 20, "--save_step", 100, "--ckpt_every", 5, "--optim", "sgd", name="cut")
    assert load_checkpoint(tmp_path / "ck" / "cut" / "last")["iter"] == 10


def test_ctrl_c_saves_last_after_the_step_and_the_rerun_resumes(run, tmp_path, monkeypatch, capsys):
    """A Ctrl-C at iteration 7 finishes that step, saves 'last' at 7 and stops; the same command resumes there."""
    import signal
    import Beta_VAE.solver as solver_module
    calls = []
    real_loss = solver_module.beta_vae_loss

    def loss_with_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(solver_module, "beta_vae_loss", loss_with_ctrl_c)
    with pytest.raises(SystemExit) as info:
        run("--max_iter", 20, "--save_step", 100, "--ckpt_every", 5, "--optim", "sgd", name="cut")
    assert info.value.code == 130
    last = tmp_path / "ck" / "cut" / "last"
    assert "resume from" in capsys.readouterr().err and load_checkpoint(last)["iter"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    monkeypatch.setattr(solver_module, "beta_vae_loss", real_loss)
    resumed = run("--max_iter", 20, "--save_step", 100, "--ckpt_every", 5, "--optim", "sgd", name="cut")
    assert resumed.history_start == 7 and resumed.global_iter == 20
    assert sorted(p.name for p in last.parent.iterdir()) == ["10", "15", "20", "5", "last"]
    assert load_checkpoint(last.parent / "5")["iter"] == 5 and load_checkpoint(last)["iter"] == 20


def test_original_format_checkpoint(run, tmp_path):
    """A checkpoint as the original code wrote it (no config) loads and resumes."""
    torch.manual_seed(0)
    net = BetaVAE_MNIST(z_dim=8)
    optim = torch.optim.SGD(net.parameters(), lr=1e-4)
    state = {"iter": 500, "win_states": {"recon": None, "kld": None, "mu": None, "var": None},
             "model_states": {"net": net.state_dict()}, "optim_states": {"optim": optim.state_dict()}}
    path = tmp_path / "ck" / "orig" / "last"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    loaded, loaded_state = load_model(path, model="MNIST", z_dim=8, nc=1)
    assert isinstance(loaded, BetaVAE_MNIST) and loaded_state["iter"] == 500
    x = torch.rand(3, 1, 28, 28)
    eps = torch.randn(3, 8)
    assert torch.equal(loaded(x, eps)[0], net.eval()(x, eps)[0])

    solver = run("--max_iter", 510, "--optim", "sgd", name="orig")
    assert solver.history_start == 500 and solver.global_iter == 510
    resaved = load_checkpoint(path)
    assert resaved["iter"] == 510 and resaved["config"]["optimizer"] == "sgd"


def test_huge_lr_stops_cleanly(run, tmp_path):
    with pytest.raises(SystemExit, match=r"diverged at iteration \d+") as info:
        run("--max_iter", 50, "--optim", "sgd", "--lr", "1e10", "--save_step", 1, "--ckpt_every", 1)
    message = str(info.value)
    assert "reconstruction loss" in message and "KL" in message
    written = [p for p in (tmp_path / "ck" / "run").iterdir()]
    assert all(_finite(p) for p in written)


def test_nonfinite_loss_names_iteration(run, tmp_path, monkeypatch):
    """The loss turns NaN at iteration 7: training stops there; the checkpoints before it are finite."""
    import Beta_VAE.solver as solver_module
    calls = []
    real_loss = solver_module.beta_vae_loss

    def loss_going_nan(*args, **kwargs):
        loss, recon, kl = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), recon, kl * float("nan")) if len(calls) == 7 else (loss, recon, kl)

    monkeypatch.setattr(solver_module, "beta_vae_loss", loss_going_nan)
    with pytest.raises(SystemExit, match="iteration 7") as info:
        run("--max_iter", 20, "--save_step", 5, "--ckpt_every", 3)
    assert "KL nan" in str(info.value)
    folder = tmp_path / "ck" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["3", "6", "last"]
    assert load_checkpoint(folder / "last")["iter"] == 5
    assert all(_finite(p) for p in folder.iterdir())


@pytest.mark.parametrize("cwd,script", [("Beta_VAE", "main.py"), (".", "Beta_VAE/main.py")])
def test_script_runs_from_both_folders(demo_data, tmp_path, cwd, script):
    env = dict(os.environ, VAE_TRACIN_DATA=str(demo_data), VAE_TRACIN_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-W", "error::DeprecationWarning", script, "--dataset", "mnist", "--seed", "1",
           "--optim", "sgd", "--lr", "1e-4", "--objective", "H", "--model", "MNIST", "--batch_size", "16",
           "--z_dim", "8", "--max_iter", "5", "--beta", "4", "--viz_on", "False", "--viz_name", "sub",
           "--train_size", "64", "--cuda", "True", "--ckpt_dir", str(tmp_path / "ck"),
           "--output_dir", str(tmp_path / "out"), "--display_step", "1e9"]
    result = subprocess.run(cmd, cwd=REPO / cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[5] recon_loss:" in result.stdout
    if not torch.cuda.is_available():
        assert "CUDA is not available: running on the CPU (--gpu 0 ignored)" in result.stderr
    assert load_checkpoint(tmp_path / "ck" / "sub" / "last")["iter"] == 5
    assert (tmp_path / "out" / "sub" / "5" / "random_z.gif").is_file()  # traversal at the end


def test_save_output_traversals_and_train_false(run, tmp_path):
    run("--max_iter", 20, "--display_step", 10, "--save_output", "True")
    for it in (10, 20):
        folder = tmp_path / "out" / "run" / str(it)
        for key in ("fixed_img", "random_img", "random_z"):
            frames = [folder / f"{key}_{j}.jpg" for j in range(10)]
            assert all(f.is_file() for f in frames)
            with Image.open(frames[0]) as img:
                assert img.size == (8 * 30 + 2, 32)  # z_dim images of 28 + 2 padding in one row
            with Image.open(folder / f"{key}.gif") as gif:
                assert gif.n_frames == 10
            with Image.open(folder / f"{key}_traversal.jpg") as img:
                assert img.size == (10 * 30 + 2, 8 * 30 + 2)  # one row per dimension

    # --train False: only a traversal of the loaded checkpoint, nothing trained or saved.
    for f in (tmp_path / "out" / "run" / "20").iterdir():
        f.unlink()
    mtime = (tmp_path / "ck" / "run" / "last").stat().st_mtime_ns
    solver = run("--train", "False", "--save_output", "True")
    assert solver.global_iter == 20
    assert (tmp_path / "out" / "run" / "20" / "fixed_img.gif").is_file()
    assert (tmp_path / "ck" / "run" / "last").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit, match="does not exist"):
        run("--train", "False", name="never_trained")


def test_conv_model_on_cifar_objective_b(shared_data, tmp_path, capsys):
    """The conv path (model H, RGB 64x64, Gaussian decoder) with objective B's capacity in the loss line."""
    solver = main(["--dataset", "cifar_zero", "--model", "H", "--z_dim", "4", "--batch_size", "8",
                   "--train_size", "32", "--max_iter", "4", "--objective", "B", "--C_stop_iter", "8",
                   "--display_step", "2", "--cuda", "False", "--viz_on", "False", "--save_output", "True",
                   "--dset_dir", str(shared_data), "--ckpt_dir", str(tmp_path / "ck"),
                   "--output_dir", str(tmp_path / "out"), "--viz_name", "c"])
    out = capsys.readouterr().out
    assert "[2] recon_loss:" in out and " C:6.250" in out and "[4] recon_loss:" in out
    assert load_checkpoint(tmp_path / "ck" / "c" / "last")["config"]["likelihood"] == "gaussian"
    with Image.open(tmp_path / "out" / "c" / "4" / "random_img_0.jpg") as img:
        assert img.mode == "RGB" and img.size == (4 * 66 + 2, 68)
    assert solver.net.input_shape == (3, 64, 64)


@pytest.mark.parametrize("flags,words", [
    (["--dataset", "mnist", "--model", "H"], ["--model H", "--dataset mnist", "64x64"]),
    (["--dataset", "cifar", "--model", "MNIST"], ["--model MNIST", "--dataset cifar", "1x28x28"]),
    (["--dataset", "cifar", "--model", "B", "--image_size", "32"], ["--model B", "--image_size 32"]),
    (["--dataset", "svhn", "--model", "MNIST"], ["--dataset must be one of", "mnist_emnist_extra"]),
    (["--max_iter", "1.5"], ["--max_iter", "whole number"]),
])
def test_bad_flags_are_one_clear_line(flags, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(flags + ["--viz_on", "False"])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(w in last_line for w in words), last_line


def test_flags_defaults_and_float_iterations():
    args = build_parser().parse_args(["--max_iter", "1.5e6", "--C_stop_iter", "1e5", "--ckpt_every", "5e4"])
    assert args.max_iter == 1_500_000 and isinstance(args.max_iter, int)
    assert args.ckpt_every == 50000 and args.C_stop_iter == 1e5
    d = build_parser().parse_args([])
    assert (d.train, d.seed, d.cuda, d.gpu, d.max_iter, d.batch_size, d.z_dim, d.beta, d.objective, d.model) == \
        (True, 1, True, 0, 1_000_000, 64, 10, 4.0, "H", "H")
    assert (d.gamma, d.C_max, d.C_stop_iter, d.optim, d.lr, d.beta1, d.beta2) == \
        (1000, 25, 1e5, "adam", 1e-4, 0.9, 0.999)
    assert (d.dset_dir, d.dataset, d.image_size, d.num_workers, d.viz_on, d.viz_name, d.viz_port) == \
        (None, "CelebA", 64, 2, True, "main", 8097)
    assert (d.save_output, d.gather_step, d.display_step, d.save_step, d.ckpt_name) == \
        (True, 1000, 50000, 10000, "last")
    assert (d.ckpt_every, d.train_size, d.extra_size) == (50000, None, 1000)
    assert Path(d.ckpt_dir) == paths.CHECKPOINT_ROOT and Path(d.output_dir) == paths.TRAIN_OUTPUT_ROOT


class _FakeVisdom:
    """Stands in for visdom.Visdom: records what would be plotted."""
    calls = []
    connected = True

    def __init__(self, port, raise_exceptions):
        self.port = port

    def check_connection(self, timeout_seconds):
        return self.connected

    def images(self, tensor, **kwargs):
        self.calls.append(("images", kwargs["env"], tuple(tensor.shape)))

    def line(self, X, Y, **kwargs):
        assert X.shape[0] == Y.shape[0]
        self.calls.append(("line", kwargs["opts"]["title"], tuple(Y.shape)))
        return kwargs.get("win") or f"win_{kwargs['opts']['title']}"


def test_visdom_plots(run, tmp_path, monkeypatch):
    _FakeVisdom.calls = []
    monkeypatch.setitem(sys.modules, "visdom", types.SimpleNamespace(Visdom=_FakeVisdom))
    run("--max_iter", 20, "--display_step", 10, "--gather_step", 5, "--viz_on", "True")
    kinds = [c[:2] for c in _FakeVisdom.calls]
    assert kinds.count(("images", "run_reconstruction")) == 2
    assert kinds.count(("images", "run_traverse")) == 3 * 2
    assert ("line", "kl divergence", (2, 8 + 2)) in _FakeVisdom.calls  # z_dim + mean + total, 2 gathers
    # Window ids are kept in the checkpoint, as the original.
    assert load_checkpoint(tmp_path / "ck" / "run" / "last")["win_states"]["recon"] == "win_reconstruction loss"


def test_visdom_missing_or_unreachable(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "visdom", None)  # import visdom -> ImportError
    with pytest.raises(SystemExit, match="pip install") as info:
        run("--max_iter", 1, "--viz_on", "True")
    assert "visdom.server" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(_FakeVisdom, "connected", False)
    monkeypatch.setitem(sys.modules, "visdom", types.SimpleNamespace(Visdom=_FakeVisdom))
    with pytest.raises(SystemExit, match="no visdom server at localhost:8097"):
        run("--max_iter", 1, "--viz_on", "True")


def test_main_imports_without_touching_sys_path():
    """Importing main in-process (as the tests do) must not rewrite sys.path[0]."""
    assert Path(main_module.__file__).parent.name == "Beta_VAE"
    assert Path(sys.path[0] or ".").resolve() != Path(main_module.__file__).resolve().parent


def test_nonfinite_weights_are_never_saved(run, tmp_path, monkeypatch):
    """Weights turned infinite by the 3rd update (its loss was finite): the save at iteration 3 refuses."""
    real_step = torch.optim.SGD.step
    steps = []

    def step_breaking_weights(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step_breaking_weights)
    with pytest.raises(SystemExit, match="iteration 3: the weights became non-finite"):
        run("--max_iter", 10, "--optim", "sgd", "--save_step", 1, "--ckpt_every", 1)
    folder = tmp_path / "ck" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "last"]
    assert load_checkpoint(folder / "last")["iter"] == 2
    assert all(_finite(p) for p in folder.iterdir())


def test_epoch_batches_resume_exactly():
    """Batches depend only on (seed, epoch, position): starting at iteration 4 continues the same sequence."""
    from itertools import islice
    from Beta_VAE.solver import epoch_batches
    full = [b.tolist() for b in islice(epoch_batches(10, 3, seed=1, start_iter=0), 9)]
    assert [b.tolist() for b in islice(epoch_batches(10, 3, seed=1, start_iter=4), 5)] == full[4:]
    for epoch in range(3):  # 3 batches per epoch (drop_last), no index twice within an epoch
        seen = sum(full[3 * epoch:3 * epoch + 3], [])
        assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert full[:3] != full[3:6]  # a new permutation each epoch
    assert [b.tolist() for b in islice(epoch_batches(10, 3, seed=2), 3)] != full[:3]


def test_traverse_matches_a_loop():
    """traverse(net, z)[j, d] decodes z with dimension d set to values[j], as the original's double loop."""
    from Beta_VAE.traverse import INTERPOLATION, traverse
    torch.manual_seed(0)
    net = BetaVAE_MNIST(z_dim=4).eval()
    z = torch.randn(1, 4)
    out = traverse(net, z)
    assert len(INTERPOLATION) == 10 and INTERPOLATION[0] == -3 and abs(INTERPOLATION[-1] - 3) < 1e-6
    assert out.shape == (10, 4, 1, 28, 28)
    for j, value in enumerate(INTERPOLATION):
        for d in range(4):
            code = z.clone()
            code[:, d] = value
            assert torch.allclose(out[j, d], torch.sigmoid(net.decode(code))[0], atol=1e-6)


def test_celeba_trains_through_dataloader_workers(shared_data, tmp_path):
    """CelebA is decoded from files: batches come from a DataLoader with --num_workers."""
    solver = main(["--dataset", "CelebA", "--model", "B", "--z_dim", "4", "--batch_size", "4", "--train_size", "12",
                   "--max_iter", "4", "--num_workers", "1", "--cuda", "False", "--viz_on", "False",
                   "--save_output", "False", "--dset_dir", str(shared_data), "--ckpt_dir", str(tmp_path / "ck"),
                   "--viz_name", "celeba"])
    assert solver.global_iter == 4 and all(torch.isfinite(torch.tensor(solver.history["loss"])))
    assert load_checkpoint(tmp_path / "ck" / "celeba" / "last")["config"]["dataset"] == "celeba"
