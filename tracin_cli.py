"""Command-line plumbing shared by ``VAE_TracIn_selfinf.py`` and ``VAE_TracIn_testinf.py``.

Flags, device, seeds, the network-config name, checkpoints, training data, test images read from a folder of
jpgs, and result files (written atomically, with the settings that made them, so ``--resume`` can check them).
No TracIn math lives here: every score comes from ``tracin_utils``.

Result files: ``<output_root>/<kind>/<network_config>/result{_lastK}{_lastepoch}.pkl`` is a ``torch.save`` dict
``{'influences', 'helpful', 'harmful', 'settings'}``. The three arrays are **torch tensors** (float64 scores,
int64 orderings; ``.numpy()`` gives the original's numpy arrays, ``.tolist()`` its lists), because numpy arrays
cannot be read back with ``torch.load(..., weights_only=True)``; ``settings`` holds only plain types. The same
settings are written as JSON next to it (``result....json``).
"""
import argparse
import functools
import hashlib
import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import paths
import tracin_utils as tu
from Beta_VAE.checkpoint import CheckpointError, atomic_torch_save, atomic_write, load_checkpoint
from Beta_VAE.dataset import DATASETS, DataError, build_dataset, dataset_spec
from Beta_VAE.runtime import select_device, set_seeds, setup_logging

log = logging.getLogger(__name__)

DEFAULT_EXTRA_SIZE = 1000  # the original appends the first 1000 EMNIST letters / CelebA faces
DEFAULT_IMAGE_SIZE = 64    # side of CIFAR / CelebA images when the checkpoint records none
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------- names
def format_beta(beta) -> str:
    """beta as written in network-config names: 4 and 4.0 -> '4', 0.5 -> '0.5' (no trailing '.0')."""
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite; got {beta}")
    return str(int(beta)) if beta.is_integer() else repr(beta)


def network_config(dataset, beta, latent_dim) -> str:
    """The checkpoint / output folder name, the training ``--viz_name`` of the README: mnist_beta4_z128_sgd."""
    return f"{dataset}_beta{format_beta(beta)}_z{int(latent_dim)}_sgd"


def result_stem(use_last_layer, last_epoch) -> str:
    """'result', 'result_last2', 'result_lastepoch', 'result_last2_lastepoch' (the original's file names)."""
    return "result{}{}".format(f"_last{use_last_layer}" if use_last_layer > 0 else "",
                               "_lastepoch" if last_epoch else "")


# ---------------------------------------------------------------------------------------------- parser
def base_parser(description, n_display) -> argparse.ArgumentParser:
    """The flags both scripts share (the original's, plus the new ones)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", default=0, type=int, help="CUDA device index; CPU (with a notice) when CUDA is absent")
    # model
    p.add_argument("--beta", type=float, required=True, help="beta the model was trained with (4, 2, 0.5, ...)")
    p.add_argument("--latent_dim", type=int, default=64, help="latent dimension the model was trained with")
    p.add_argument("--ckpt_iter", type=int, default=1500000,
                   help="checkpoint for the ELBO plot / latent features / generation; the last numbered one "
                        "when that file does not exist")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset the model was trained on")
    # TracIn
    p.add_argument("--resume", action="store_true",
                   help="reuse the result file if its recorded settings match these (else recompute)")
    p.add_argument("--use_last_layer", default=0, type=int,
                   help="if k > 0, gradients of the last k parameter tensors of encoder and decoder only")
    p.add_argument("--last_epoch", action="store_true", help="use only the last checkpoint")
    p.add_argument("--reconstruct_num", default=16, type=int,
                   help="reparameterisation draws the loss of one sample is averaged over")
    p.add_argument("--loss", default="train", choices=tu.LOSSES,
                   help="'train': the model's training objective; 'original': the original code's "
                        "(sigmoid-MSE + beta KL) / (3*64*64)")
    p.add_argument("--seed", default=0, type=int, help="seed of everything random, TracIn's noise included")
    p.add_argument("--chunk_size", default=None, type=int,
                   help="samples per vectorised gradient chunk (default: from a 256 MiB working set on a CPU, "
                        "2 GiB on a GPU)")
    # files
    p.add_argument("--ckpt_root", default=str(paths.CHECKPOINT_ROOT),
                   help="folder holding <network_config>/ with numbered checkpoints (default: Beta_VAE/checkpoints)")
    p.add_argument("--ckpt_suffix", default="",
                   help="use only checkpoints whose number ends with this ('' = all; the original used '0000')")
    p.add_argument("--output_root", default=str(paths.OUTPUT_ROOT),
                   help="results go to <output_root>/<kind>/<network_config>/ (default: <repo>/output)")
    p.add_argument("--dset_dir", default=None, help=f"data root (default: ${paths.DATA_ENV_VAR}, else <repo>/data)")
    p.add_argument("--train_size", default=None, type=int,
                   help="first N base training samples (default: as recorded in the checkpoint, else all)")
    p.add_argument("--extra_size", default=None, type=int,
                   help=f"extra samples of *_extra datasets (default: as recorded, else {DEFAULT_EXTRA_SIZE})")
    # output
    p.add_argument("--n_display", type=int, default=n_display,
                   help="number of most / least influential samples shown per image")
    return p


# -------------------------------------------------------------------------------------- process set-up
def guarded(main):
    """The project's expected errors (checkpoints, data) as ``SystemExit('error: <one line>')``; Ctrl-C as one
    line (the checkpoints already finished are kept for the rerun)."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except (CheckpointError, DataError) as exc:
            raise SystemExit("error: " + " ".join(str(exc).split())) from None
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume: the checkpoints already finished are kept",
                  file=sys.stderr)
            raise SystemExit(130) from None
    return wrapper


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """What one invocation works on, resolved from the flags."""

    args: argparse.Namespace
    device: torch.device
    name: str                 # network config, e.g. mnist_beta4_z128_sgd
    ckpt_folder: Path
    checkpoints: list         # [(iteration, path)] used by TracIn
    cfg: tu.TracInConfig
    feature: tu.TracInCheckpoint  # the --ckpt_iter checkpoint: ELBO plot, latents, generation
    recorded: dict            # the training config recorded in that checkpoint ({} for the original's)
    train_data: object        # Beta_VAE.dataset dataset
    train_size: object
    extra_size: object
    image_size: int
    out_dir: Path
    result_path: Path

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / f"cache_{self.result_path.stem}"

    @property
    def data_tag(self) -> dict:
        """What identifies the training samples: dataset, sizes and the data folder they were read from."""
        return {"dataset": self.args.dataset, "train_size": self.train_size, "extra_size": self.extra_size,
                "image_size": self.image_size, "n_train": len(self.train_data),
                "data_root": str(paths.data_root(self.args.dset_dir))}

    def identity(self, **extra) -> dict:
        """Everything that decides the scores; a stored result is reused only if all of it matches."""
        stamp = hashlib.sha256(json.dumps(
            [[it, p.stat().st_size, p.stat().st_mtime_ns] for it, p in self.checkpoints]).encode()).hexdigest()[:16]
        a = self.args
        return {"network_config": self.name, "dataset": a.dataset, "beta": float(a.beta),
                "latent_dim": int(a.latent_dim), "loss": a.loss, "reconstruct_num": a.reconstruct_num,
                "use_last_layer": a.use_last_layer, "last_epoch": bool(a.last_epoch), "seed": a.seed,
                "ckpt_suffix": a.ckpt_suffix, **self.data_tag,
                "checkpoint_iterations": [it for it, _ in self.checkpoints], "checkpoint_stamp": stamp, **extra}


def feature_checkpoint(folder, ckpt_iter):
    """(iteration, path) of checkpoint ``ckpt_iter``, or of the last numbered one (with a notice) if it is absent."""
    path = Path(folder) / str(ckpt_iter)
    if path.is_file():
        return int(ckpt_iter), path
    iteration, path = tu.find_checkpoints(folder)[-1]
    log.info("--ckpt_iter %d: no file %s; the ELBO / latents / samples use the last numbered checkpoint, %d",
             ckpt_iter, Path(folder) / str(ckpt_iter), iteration)
    return iteration, path


def _sizes(args, recorded, spec):
    """train_size / extra_size: the flag, else the checkpoint's recorded value, else all / 1000."""
    train_size = args.train_size if args.train_size is not None else recorded.get("train_size")
    if args.train_size is not None and recorded.get("train_size", args.train_size) != args.train_size:
        log.warning("--train_size %s differs from the %s samples the model was trained on",
                    args.train_size, recorded.get("train_size") or "all")
    if spec["extra"] is None:
        return train_size, None
    extra_size = args.extra_size if args.extra_size is not None else recorded.get("extra_size")
    if extra_size is None:
        extra_size = DEFAULT_EXTRA_SIZE
    if args.extra_size is not None and recorded.get("extra_size", args.extra_size) != args.extra_size:
        log.warning("--extra_size %s differs from the %s extras the model was trained with",
                    args.extra_size, recorded.get("extra_size"))
    return train_size, int(extra_size)


def prepare(args, kind) -> Run:
    """Seed everything and set up logging, then resolve device, checkpoints (checked against the flags), training
    data and output paths."""
    set_seeds(args.seed)
    setup_logging()
    device = select_device(args.gpu)
    name = network_config(args.dataset, args.beta, args.latent_dim)
    folder = Path(args.ckpt_root).expanduser() / name
    checkpoints = tu.find_checkpoints(folder, suffix=args.ckpt_suffix, last_epoch=args.last_epoch)
    try:
        cfg = tu.TracInConfig(dataset=args.dataset, z_dim=args.latent_dim, beta=args.beta,
                              reconstruct_num=args.reconstruct_num, use_last_layer=args.use_last_layer,
                              loss=args.loss, seed=args.seed, chunk_size=args.chunk_size)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    iteration, path = feature_checkpoint(folder, args.ckpt_iter)
    # Loading through the engine checks the recorded dataset / z_dim / beta against the flags.
    feature = tu.load_tracin_checkpoint(iteration, path, 0, 1, cfg, device=device)
    recorded = load_checkpoint(path).get("config") or {}
    spec = dataset_spec(args.dataset)
    train_size, extra_size = _sizes(args, recorded, spec)
    image_size = int(recorded.get("image_size") or DEFAULT_IMAGE_SIZE)
    train_data = build_dataset(args.dataset, train=True, train_size=train_size,
                               extra_size=extra_size if extra_size is not None else 0,
                               image_size=image_size, data_dir=args.dset_dir)
    if tuple(train_data.image_shape) != tuple(feature.net.input_shape):
        raise SystemExit(f"error: {args.dataset} images are {tuple(train_data.image_shape)} but the model in "
                         f"{path} takes {tuple(feature.net.input_shape)}")
    log.info("%s: %d training samples, %d checkpoint(s) %s, device %s", name, len(train_data), len(checkpoints),
             [it for it, _ in checkpoints], device)
    out_dir = Path(args.output_root).expanduser() / kind / name
    return Run(args=args, device=device, name=name, ckpt_folder=folder, checkpoints=checkpoints, cfg=cfg,
               feature=feature, recorded=recorded, train_data=train_data, train_size=train_size,
               extra_size=extra_size, image_size=image_size, out_dir=out_dir,
               result_path=out_dir / f"{result_stem(args.use_last_layer, args.last_epoch)}.pkl")


# ---------------------------------------------------------------------------------------------- results
def save_result(path, influences, helpful, harmful, settings):
    """Write the result dict (tensors + settings) and the settings as JSON, each atomically."""
    blob = {"influences": torch.as_tensor(np.asarray(influences, dtype=np.float64)),
            "helpful": torch.as_tensor(np.asarray(helpful, dtype=np.int64)),
            "harmful": torch.as_tensor(np.asarray(harmful, dtype=np.int64)),
            "settings": settings}
    atomic_torch_save(blob, path)
    with atomic_write(Path(path).with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=2) + "\n")


def try_resume(path, identity):
    """(result dict, None) if ``path`` holds a result made with ``identity``, else (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, f"no result file {path}"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        return None, f"{path} is unreadable ({type(exc).__name__})"
    stored = blob.get("settings") if isinstance(blob, dict) else None
    if not isinstance(stored, dict) or not all(k in blob for k in ("influences", "helpful", "harmful")):
        return None, f"{path} records no settings"
    diffs = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in identity.items() if stored.get(k) != v]
    if diffs:
        return None, "settings differ (" + "; ".join(diffs) + ")"
    return blob, None


def load_or_compute(run: Run, identity: dict, compute):
    """Reuse the result file under --resume when its settings match, else call ``compute(cache_dir)`` (an
    ``InfluenceResult``; ``cache_dir`` keeps its per-checkpoint partial sums) and save it. Returns a namespace:
    influences / helpful / harmful (numpy), settings, recomputed (bool)."""
    if run.args.resume:
        blob, why = try_resume(run.result_path, identity)
        if blob is not None:
            print(f"loaded scores from {run.result_path}")
            return SimpleNamespace(influences=blob["influences"].numpy(), helpful=blob["helpful"].numpy(),
                                   harmful=blob["harmful"].numpy(), settings=blob["settings"], recomputed=False)
        print(f"--resume: recomputing: {why}")
    result = compute(run.cache_dir)
    settings = {**identity, "checkpoints": [{k: c[k] for k in ("iteration", "lr", "batch_size", "weight", "path")}
                                            for c in result.checkpoints],
                "checkpoint_folder": str(run.ckpt_folder), "feature_checkpoint": run.feature.iteration,
                "chunk_size": run.args.chunk_size, "device": str(run.device)}
    save_result(run.result_path, result.influences, result.helpful, result.harmful, settings)
    # The per-checkpoint cache only serves interrupted runs; the result file supersedes it.
    shutil.rmtree(run.cache_dir, ignore_errors=True)
    print(f"saved scores to {run.result_path}")
    return SimpleNamespace(influences=np.asarray(result.influences), helpful=np.asarray(result.helpful),
                           harmful=np.asarray(result.harmful), settings=settings, recomputed=True)


# ----------------------------------------------------------------------------------- images and latents
def train_labels(train_data):
    """Labels of the training set for label comparisons; extras (letters, faces) get -1, never a digit."""
    labels = train_data.labels.clone()
    if len(train_data.extra_indices):
        labels[train_data.n_base:] = -1
    return labels.numpy()


def file_index(name):
    """The last integer in a file's stem: 'test_12.jpg' -> 12, '3.jpg' -> 3, 'notes.jpg' -> None."""
    found = re.findall(r"\d+", Path(name).stem)
    return int(found[-1]) if found else None


def resolve_dir(folder):
    """A folder given on the command line: as given (relative to the working directory), else relative to the
    repository root, so the README's ``output/images/test_mnist`` works from anywhere."""
    folder = Path(folder).expanduser()
    if not folder.exists() and not folder.is_absolute() and (paths.REPO_ROOT / folder).exists():
        return paths.REPO_ROOT / folder
    return folder


def load_test_images(folder, input_shape):
    """Images of a folder as test points, ordered by the number in their names (3 before 12).

    Converted to the model's channels (grayscale for 1, RGB for 3) and size. Non-image files are skipped with
    a warning. Returns (images (T, C, H, W) float in [0, 1], names, indices (int or None per image)).
    """
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.functional as TF

    folder = resolve_dir(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: --load_from_jpg_dir {folder} does not exist (export test images with "
                         f"tools/export_test_images.py)")
    channels, height, width = input_shape
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            log.warning("--load_from_jpg_dir: skipping %s: not an image file", path.name)
            continue
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.BILINEAR)
                tensor = TF.to_tensor(img)
        except (OSError, UnidentifiedImageError) as exc:
            log.warning("--load_from_jpg_dir: skipping %s: unreadable image (%s)", path.name, exc)
            continue
        index = file_index(path.name)
        if index is None:
            log.warning("--load_from_jpg_dir: %s has no index in its name (test_<index>.jpg): used as a test image "
                        "without a label", path.name)
        entries.append((index, path.name, tensor))
    if not entries:
        raise SystemExit(f"error: --load_from_jpg_dir {folder} holds no images (expected test_<index>.jpg files)")
    entries.sort(key=lambda e: (e[0] is None, e[0] if e[0] is not None else 0, e[1]))
    return (torch.stack([e[2] for e in entries]), [e[1] for e in entries], [e[0] for e in entries])


def test_split_labels(dataset, indices, data_dir):
    """Labels of the test split (build_dataset(dataset, train=False)) at ``indices``; -1 where unknown."""
    try:
        # image_size 32 keeps CIFAR at its stored size: only the labels are needed.
        labels = build_dataset(dataset, train=False, image_size=32, data_dir=data_dir).labels
    except DataError as exc:
        log.warning("no test labels (%s): label plots skipped", " ".join(str(exc).split()))
        return np.full(len(indices), -1)
    beyond = [i for i in indices if i is not None and not 0 <= i < len(labels)]
    if beyond:
        log.warning("test image index(es) %s beyond the %d images of the %s test split: no label for them",
                    ", ".join(map(str, beyond[:5])) + (" ..." if len(beyond) > 5 else ""), len(labels), dataset)
    return np.array([int(labels[i]) if i is not None and 0 <= i < len(labels) else -1 for i in indices])


@torch.no_grad()
def sample_prior(net, n, seed, device):
    """n images decoded from z ~ N(0, I) (seeded), sigmoid applied: (n, C, H, W) on the CPU."""
    z = torch.randn(n, net.z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(net.decode(z.to(device))).cpu()


@torch.no_grad()
def encode_means(net, data, device, chunk=1024):
    """Posterior means mu of a dataset (with get_batch) or an image tensor: (N, z_dim) on the CPU."""
    out = []
    for start in range(0, len(data), chunk):
        idx = torch.arange(start, min(start + chunk, len(data)))
        images = data[idx] if torch.is_tensor(data) else data.get_batch(idx)[0]
        out.append(net.encode(images.to(device))[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0, net.z_dim)
