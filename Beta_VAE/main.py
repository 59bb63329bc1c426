"""Train a beta-VAE (the command line of 1Konny's Beta-VAE as extended by the VAE-TracIn authors).

Runs from the repository root (``python Beta_VAE/main.py ...``) or from ``Beta_VAE/`` (``python main.py ...``)::

    python main.py --dataset mnist --seed 1 --optim sgd --lr 1e-4 --objective H --model MNIST --batch_size 64 \
        --z_dim 128 --max_iter 1.5e6 --beta 4 --viz_on False --viz_name mnist_beta4_z128_sgd

Checkpoints go to ``<ckpt_dir>/<viz_name>/`` ('last' and one per --ckpt_every iterations), traversal images to
``<output_dir>/<viz_name>/<iteration>/``. Rerunning the same command resumes from 'last'.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    # Run as a script from Beta_VAE/: import from the repository root instead, so `Beta_VAE.model` is the only
    # `model` and `paths` resolves.
    sys.path[0] = str(_HERE.parent)

import argparse  # noqa: E402
import logging  # noqa: E402

import torch  # noqa: E402

import paths  # noqa: E402
from Beta_VAE.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from Beta_VAE.dataset import DATASETS, DataError, dataset_spec  # noqa: E402
from Beta_VAE.model import MODELS  # noqa: E402
from Beta_VAE.runtime import one_line_warnings, select_device, set_seeds, setup_logging  # noqa: E402

log = logging.getLogger("Beta_VAE")


def str2bool(v):
    """The original's boolean flag parser."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True/False), got {v!r}")


def count(v):
    """A non-negative whole number written as an int or a float: '1000', '1e5', '1.5e6'."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 1000 or 1.5e6, got {v!r}") from None
    if not x.is_integer() or x < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative whole number, got {v!r}")
    return int(x)


def build_parser():
    p = argparse.ArgumentParser(description="beta-VAE training (VAE-TracIn)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Flags of the original, same names, meanings and defaults.
    p.add_argument("--train", default=True, type=str2bool, help="train; False: only traverse the checkpoint")
    p.add_argument("--seed", default=1, type=int, help="random seed")
    p.add_argument("--cuda", default=True, type=str2bool, help="use CUDA when available")
    p.add_argument("--gpu", default=0, type=int, help="CUDA device index")
    p.add_argument("--max_iter", default=1e6, type=count, help="maximum training iteration")
    p.add_argument("--batch_size", default=64, type=int, help="batch size")
    p.add_argument("--z_dim", default=10, type=int, help="dimension of the representation z")
    p.add_argument("--beta", default=4, type=float, help="beta of objective H (Higgins et al.)")
    p.add_argument("--objective", default="H", type=str, choices=("H", "B"),
                   help="H: recon + beta*KL (Higgins et al.); B: recon + gamma*|KL - C| (Burgess et al.)")
    p.add_argument("--model", default="H", type=str, choices=MODELS,
                   help="H / B: conv nets for 64x64 images; MNIST: MLP for 1x28x28 images")
    p.add_argument("--gamma", default=1000, type=float, help="gamma of objective B")
    p.add_argument("--C_max", default=25, type=float, help="capacity C_max of objective B")
    p.add_argument("--C_stop_iter", default=1e5, type=float, help="iteration where C reaches C_max")
    p.add_argument("--optim", default="adam", type=str, choices=("adam", "sgd"), help="optimizer")
    p.add_argument("--lr", default=1e-4, type=float, help="learning rate")
    p.add_argument("--beta1", default=0.9, type=float, help="Adam beta1")
    p.add_argument("--beta2", default=0.999, type=float, help="Adam beta2")
    p.add_argument("--dset_dir", default=None, type=str,
                   help=f"data root; when not given: ${paths.DATA_ENV_VAR}, else {paths.DEFAULT_DATA_ROOT}")
    p.add_argument("--dataset", default="CelebA", type=str, help=f"one of {', '.join(DATASETS)} (any case)")
    p.add_argument("--image_size", default=64, type=int, help="image side for CIFAR / CelebA (MNIST stays 28)")
    p.add_argument("--num_workers", default=2, type=int, help="DataLoader workers (CelebA only)")
    p.add_argument("--viz_on", default=True, type=str2bool, help="plot to a visdom server")
    p.add_argument("--viz_name", default="main", type=str, help="run name: checkpoint / output sub-folder")
    p.add_argument("--viz_port", default=8097, type=int, help="visdom port")
    p.add_argument("--save_output", default=True, type=str2bool, help="save latent traversal images")
    p.add_argument("--output_dir", default=str(paths.TRAIN_OUTPUT_ROOT), type=str, help="traversal image root")
    p.add_argument("--gather_step", default=1000, type=count, help="visdom line point every N iterations")
    p.add_argument("--display_step", default=50000, type=count, help="loss line and traversal every N iterations")
    p.add_argument("--save_step", default=10000, type=count, help="rewrite checkpoint 'last' every N iterations")
    p.add_argument("--ckpt_dir", default=str(paths.CHECKPOINT_ROOT), type=str, help="checkpoint root")
    p.add_argument("--ckpt_name", default="last", type=str, help="checkpoint to resume from, in <ckpt_dir>/<viz_name>")
    # New flags.
    p.add_argument("--ckpt_every", default=50000, type=count,
                   help="numbered checkpoint every N iterations (the original's hard-coded 50000; 0: none)")
    p.add_argument("--train_size", default=None, type=count, help="first N samples of the base dataset (default all)")
    p.add_argument("--extra_size", default=1000, type=count, help="extra samples of the *_extra datasets")
    return p


def check_args(parser, args):
    """Normalise the dataset name and reject flag combinations the networks cannot run, with one clear line."""
    try:
        spec = dataset_spec(args.dataset)
    except DataError as exc:
        parser.error(str(exc))
    args.dataset = spec["name"]
    if spec["base"] == "mnist":
        shape = "1x28x28"
    else:
        shape = f"3x{args.image_size}x{args.image_size} (--image_size {args.image_size})"
    if args.model == "MNIST" and spec["base"] != "mnist":
        parser.error(f"--model MNIST takes 1x28x28 images but --dataset {args.dataset} gives {shape}; "
                     f"use --model H or B")
    if args.model in ("H", "B") and (spec["base"] == "mnist" or args.image_size != 64):
        parser.error(f"--model {args.model} takes 64x64 images but --dataset {args.dataset} gives {shape}; "
                     + ("use --model MNIST" if spec["base"] == "mnist" else "use --image_size 64"))
    for flag in ("batch_size", "z_dim"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive; got {getattr(args, flag)}")
    if args.train_size == 0:
        parser.error("--train_size must be positive")
    return args


def main(argv=None):
    """Parse ``argv`` (default sys.argv[1:]), train or traverse; returns the Solver."""
    parser = build_parser()
    args = parser.parse_args(argv)
    set_seeds(args.seed)
    setup_logging()
    check_args(parser, args)
    device = select_device(args.gpu, use_cuda=args.cuda)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    from Beta_VAE.solver import Solver, TrainingDiverged
    try:
        solver = Solver(args, device)
        if args.train:
            solver.train()
        elif not (args.save_output or args.viz_on):
            log.warning("--train False with --save_output False and --viz_on False: nothing to do")
        else:
            solver.visualize()
    except (DataError, CheckpointError, TrainingDiverged) as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        last = Path(args.ckpt_dir) / args.viz_name / "last"
        if last.is_file():
            where = f"from {last} (iteration {load_checkpoint(last)['iter']})"
        else:
            where = "from scratch (no checkpoint was saved)"
        print(f"interrupted; rerun the same command to resume {where}", file=sys.stderr)
        raise SystemExit(130) from None
    return solver


if __name__ == "__main__":
    one_line_warnings()
    main()
