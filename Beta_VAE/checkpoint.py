"""The one checkpoint format and loader, compatible both ways with the original Beta-VAE / VAE-TracIn code.

A checkpoint is ``torch.save`` of::

    {'iter': int, 'win_states': {...}, 'model_states': {'net': state_dict},
     'optim_states': {'optim': optimizer state_dict}, 'config': {...}}   # 'config' is ours, optional

``config`` records what TracIn needs later: dataset, train_size, extra_size, model, objective, z_dim, nc, beta,
gamma, C_max, C_stop_iter, likelihood, optimizer, lr, batch_size, seed, image_size. The authors' published
checkpoints have no ``config``; callers then supply the missing values.
"""
import contextlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from Beta_VAE.model import build_model

log = logging.getLogger(__name__)

LAST = "last"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, empty, corrupt, non-finite or inconsistent; the message names the file."""


@contextlib.contextmanager
def atomic_write(path):
    """The project's one way to write a file: yield a temporary path in the folder of ``path`` (hidden name, same
    suffix, so writers that infer the format from it work); when the block succeeds the file is synced to disk,
    given the permissions of a new file under the umask (not mkstemp's 0600) and renamed to ``path``, so a reader
    never sees half a file; when it fails the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    """torch.save through atomic_write: a reader never sees a half-written checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def make_state(net, optim, iteration, config, win_states=None):
    return {"iter": int(iteration),
            "win_states": win_states or {"recon": None, "kld": None, "mu": None, "var": None},
            "model_states": {"net": net.state_dict()},
            "optim_states": {"optim": optim.state_dict()},
            "config": dict(config)}


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint file (weights only: no code in it runs). Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted save? delete or re-train it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or "net" not in state.get("model_states", {}):
        raise CheckpointError(f"checkpoint {path} lacks model_states['net']: not a Beta-VAE checkpoint")
    return state


def check_finite(state, path):
    for name, tensor in state["model_states"]["net"].items():
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path} has non-finite weights in {name}: training diverged "
                                  f"before this save; remove it or train again with a smaller --lr")


def optimizer_kind(state):
    """'sgd' or 'adam' from the config or the optimizer state; None when unknown."""
    config = state.get("config") or {}
    if config.get("optimizer"):
        return config["optimizer"]
    groups = state.get("optim_states", {}).get("optim", {}).get("param_groups", [])
    if groups:
        return "adam" if "betas" in groups[0] else "sgd"
    return None


def optimizer_lr(state):
    config = state.get("config") or {}
    if config.get("lr") is not None:
        return float(config["lr"])
    groups = state.get("optim_states", {}).get("optim", {}).get("param_groups", [])
    return float(groups[0]["lr"]) if groups else None


def load_model(path, *, model=None, z_dim=None, nc=None, device="cpu", dtype=None, check=True):
    """Rebuild the network of a checkpoint and load its weights.

    The architecture comes from the checkpoint's config; model / z_dim / nc are needed only for checkpoints
    without one (the original's), and must agree with the config when both are given.
    Returns (net in eval mode on ``device``, state dict of the checkpoint).
    """
    state = load_checkpoint(path)
    if check:
        check_finite(state, path)
    config = state.get("config") or {}
    arch = {"model": config.get("model", model), "z_dim": config.get("z_dim", z_dim),
            "nc": config.get("nc", nc)}
    for key, given in (("model", model), ("z_dim", z_dim), ("nc", nc)):
        if given is not None and arch[key] is not None and given != arch[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={arch[key]!r}, "
                                  f"but {given!r} was asked for")
        if arch[key] is None:
            raise CheckpointError(f"checkpoint {path} records no config; give {key} to rebuild its network")
    net = build_model(arch["model"], arch["z_dim"], arch["nc"])
    try:
        net.load_state_dict(state["model_states"]["net"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit model {arch['model']} with z_dim "
                              f"{arch['z_dim']}: {str(exc).splitlines()[0]}") from None
    net = net.to(device=device, dtype=dtype) if dtype is not None else net.to(device)
    return net.eval(), state


def list_checkpoints(folder, suffix="", last_epoch=False):
    """Numbered checkpoints in ``folder``: [(iteration, path)] sorted numerically.

    Names that are not integers ('last', temp files, ...) are ignored; ``suffix`` keeps only names ending with
    it (the original used '0000'); ``last_epoch`` keeps only the final checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist: train the model first "
                              f"(Beta_VAE/main.py with --viz_name {folder.name}) or pass --ckpt_root")
    found = sorted((int(p.name), p) for p in folder.iterdir()
                   if p.is_file() and p.name.isdigit() and p.name.endswith(suffix))
    if not found:
        raise CheckpointError(f"no numbered checkpoints{f' ending in {suffix!r}' if suffix else ''} in {folder}")
    return found[-1:] if last_epoch else found


def checkpoint_gaps(iterations):
    """Iterations covered by each checkpoint: the gap from the previous one, the first counted from 0."""
    gaps, previous = [], 0
    for it in iterations:
        gaps.append(it - previous)
        previous = it
    return gaps
