"""The beta-VAE training loop (1Konny's Beta-VAE ``Solver``, as extended by the VAE-TracIn authors).

What it keeps from the original: the iteration count as the unit of everything (``--max_iter``,
``--display_step``, ``--save_step``), ``<ckpt_dir>/<viz_name>/last`` rewritten every ``--save_step`` and a numbered
checkpoint every ``--ckpt_every`` (the original's hard-coded 50000), resume from ``--ckpt_name``, shuffled
batches with drop_last, the loss line and the visdom plots.

What differs: data batches come from the dataset's ``get_batch`` with a permutation drawn per epoch from
(seed, epoch), so a resumed run sees the same batches as an uninterrupted one; a non-finite loss stops training
before the optimizer step and no checkpoint with non-finite weights is written; checkpoints record a config.
"""
import logging
import math
from array import array
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from Beta_VAE.checkpoint import (LAST, CheckpointError, atomic_torch_save, check_finite, load_checkpoint,
                                 make_state, optimizer_kind)
from Beta_VAE.dataset import DataError, ImageDataset, build_dataset, dataset_spec
from Beta_VAE.losses import beta_vae_loss, capacity, kl_divergence
from Beta_VAE.model import build_model
from Beta_VAE.runtime import InterruptAfterStep
from Beta_VAE.traverse import Visdom, run_traversal

log = logging.getLogger(__name__)

# Config entries that must match to resume from a checkpoint: they fix the network, the data it is trained on and
# the objective, so every checkpoint of a run folder answers to the same TracIn flags (--beta, --dataset, sizes).
MUST_MATCH = ("dataset", "train_size", "extra_size", "image_size", "model", "z_dim", "nc", "objective", "beta",
              "likelihood")
# Objective B's own settings, which must match too when it is the objective.
MUST_MATCH_B = ("gamma", "C_max", "C_stop_iter")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the message gives the iteration, reconstruction loss and KL."""


def epoch_batches(n, batch_size, seed, start_iter=0):
    """Endless index batches (batch_size,) int64: a permutation of range(n) per epoch, last partial batch dropped.

    The permutation of epoch e depends only on (seed, e), so starting at ``start_iter`` (completed iterations)
    yields exactly the batches an uninterrupted run would see from there.
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch_size {batch_size} is larger than the {n} training images")
    epoch, position = divmod(int(start_iter), per_epoch)
    while True:
        order = torch.from_numpy(np.random.default_rng([int(seed) % 2 ** 32, epoch]).permutation(n))
        for b in range(position, per_epoch):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch, position = epoch + 1, 0


class _EpochBatchSampler:
    """``epoch_batches`` as a DataLoader batch sampler (for datasets decoded from files by workers)."""

    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return (batch.tolist() for batch in epoch_batches(*self.args))


def every(step, iteration):
    """True when ``iteration`` is a multiple of ``step``; a step of 0 means never."""
    return step > 0 and iteration % step == 0


class Solver:
    """Trains one beta-VAE as the command line ``args`` say (see main.py for the flags).

    ``history`` holds this run's per-iteration losses: iterations ``history_start + 1 ...`` in float32 arrays
    'loss', 'recon', 'kl'.
    """

    def __init__(self, args, device):
        self.args = args
        self.device = torch.device(device)
        self.spec = dataset_spec(args.dataset)
        self.dataset = build_dataset(self.spec["name"], train=True, train_size=args.train_size,
                                     extra_size=args.extra_size, image_size=args.image_size,
                                     data_dir=args.dset_dir)
        log.info("dataset %s: %d images of shape %s (%d extra)", self.spec["name"], len(self.dataset),
                 "x".join(map(str, self.dataset.image_shape)), self.dataset.n_extra)
        if args.train and len(self.dataset) < args.batch_size:
            raise DataError(f"--batch_size {args.batch_size} is larger than the {len(self.dataset)} training "
                            f"images of {self.spec['name']}")
        nc = self.spec["nc"]
        self.net = build_model(args.model, args.z_dim, nc).to(self.device)
        if tuple(self.dataset.image_shape) != tuple(self.net.input_shape):
            raise ValueError(f"--model {args.model} takes {self.net.input_shape} images but --dataset "
                             f"{args.dataset} gives {self.dataset.image_shape}")
        self.optim = self._make_optimizer()
        self.max_iter = int(args.max_iter)
        self.config = {
            "dataset": self.spec["name"], "train_size": args.train_size, "extra_size": self.dataset.n_extra,
            "model": args.model, "objective": args.objective, "z_dim": args.z_dim, "nc": nc,
            "beta": float(args.beta), "gamma": float(args.gamma), "C_max": float(args.C_max),
            "C_stop_iter": float(args.C_stop_iter), "likelihood": self.spec["likelihood"],
            "optimizer": args.optim, "lr": float(args.lr), "batch_size": args.batch_size, "seed": args.seed,
            "image_size": self.dataset.image_shape[-1], "max_iter": self.max_iter,
        }
        self.ckpt_dir = Path(args.ckpt_dir) / args.viz_name
        self.output_dir = Path(args.output_dir) / args.viz_name if args.save_output else None
        self.global_iter = 0
        self.win_states = None
        if args.ckpt_name:
            self.load(args.ckpt_name, required=not args.train)
        self.viz = (Visdom(args.viz_name, args.viz_port, args.z_dim, self.win_states) if args.viz_on else None)
        self.history_start = self.global_iter
        self.history = {"loss": array("f"), "recon": array("f"), "kl": array("f")}

    # ------------------------------------------------------------------------------------------ set-up
    def _make_optimizer(self):
        a = self.args
        if a.optim == "sgd":
            return torch.optim.SGD(self.net.parameters(), lr=a.lr)
        if a.optim == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=a.lr, betas=(a.beta1, a.beta2))
        raise ValueError(f"--optim must be adam or sgd; got {a.optim!r}")

    def _batches(self):
        """Endless (B, C, H, W) float batches on the device, starting after ``global_iter`` iterations."""
        a = self.args
        if isinstance(self.dataset, ImageDataset):  # in memory: gather the batch directly, no workers
            for idx in epoch_batches(len(self.dataset), a.batch_size, a.seed, self.global_iter):
                yield self.dataset.get_batch(idx)[0].to(self.device, non_blocking=True)
        else:  # decoded from image files: DataLoader workers
            loader = torch.utils.data.DataLoader(
                self.dataset, num_workers=a.num_workers, pin_memory=self.device.type == "cuda",
                batch_sampler=_EpochBatchSampler(len(self.dataset), a.batch_size, a.seed, self.global_iter))
            for x, _ in loader:
                yield x.to(self.device, non_blocking=True)

    # ----------------------------------------------------------------------------------- checkpoints
    def load(self, name, required=False):
        """Resume from ``<ckpt_dir>/<viz_name>/<name>``: weights, optimizer state, iteration, visdom windows."""
        path = self.ckpt_dir / name
        if not path.is_file():
            if required:
                raise CheckpointError(f"checkpoint {path} does not exist: train first (--train True) or give "
                                      f"--ckpt_dir / --viz_name / --ckpt_name of an existing one")
            log.info("no checkpoint at %s: training from scratch", path)
            return False
        state = load_checkpoint(path, map_location=self.device)
        check_finite(state, path)
        config = state.get("config") or {}
        must_match = MUST_MATCH + (MUST_MATCH_B if self.config["objective"] == "B" else ())
        for key in must_match:
            if key in config and config[key] != self.config[key]:
                raise CheckpointError(f"checkpoint {path} was trained with {key}={config[key]!r}, but this run "
                                      f"has {key}={self.config[key]!r}: pass the same flags or another "
                                      f"--viz_name")
        changed = [f"{k}: {config[k]!r} -> {self.config[k]!r}" for k in self.config
                   if k in config and k not in must_match + ("max_iter",) and config[k] != self.config[k]]
        if changed:
            log.warning("resuming %s with changed settings (%s)", path, "; ".join(changed))
        try:
            self.net.load_state_dict(state["model_states"]["net"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit --model {self.args.model} with --z_dim "
                                  f"{self.args.z_dim}: {str(exc).splitlines()[0]}") from None
        kind = optimizer_kind(state)
        optim_state = state.get("optim_states", {}).get("optim")
        if optim_state and kind in (None, self.args.optim):
            self.optim.load_state_dict(optim_state)
            for group in self.optim.param_groups:  # the flags win over the saved hyper-parameters
                group["lr"] = self.args.lr
                if "betas" in group:
                    group["betas"] = (self.args.beta1, self.args.beta2)
        else:
            log.warning("checkpoint %s has %s optimizer state; starting a fresh --optim %s", path,
                        kind or "no", self.args.optim)
        self.global_iter = int(state["iter"])
        self.win_states = state.get("win_states")
        log.info("loaded checkpoint %s (iter %d)", path, self.global_iter)
        return True

    def weights_finite(self):
        return bool(torch.stack([p.detach().isfinite().all() for p in self.net.parameters()]).all())

    def save(self, name, last_values=None):
        """Write ``<ckpt_dir>/<viz_name>/<name>`` atomically; never a checkpoint with non-finite weights."""
        if not self.weights_finite():
            recon, kl = last_values or (float("nan"), float("nan"))
            raise TrainingDiverged(f"training diverged at iteration {self.global_iter}: the weights became "
                                   f"non-finite (last reconstruction loss {recon:.4g}, KL {kl:.4g}); "
                                   f"{name!r} was not saved; lower --lr")
        wins = self.viz.wins if self.viz is not None else self.win_states
        atomic_torch_save(make_state(self.net, self.optim, self.global_iter, self.config, wins),
                          self.ckpt_dir / name)

    # -------------------------------------------------------------------------------------- training
    def train(self):
        a = self.args
        if self.global_iter >= self.max_iter:
            log.info("checkpoint %s is at iteration %d >= --max_iter %d: training already finished",
                     self.ckpt_dir / a.ckpt_name, self.global_iter, self.max_iter)
            return self
        self.net.train()
        batches = self._batches()
        pbar = tqdm(total=self.max_iter, initial=self.global_iter, desc=a.viz_name, dynamic_ncols=True,
                    mininterval=1.0)
        # The last iteration whose loss line / traversal and 'last' checkpoint were written.
        shown = saved = -1
        values, C = None, capacity(self.global_iter, a.C_max, a.C_stop_iter)
        # A first Ctrl-C takes effect after the current step, so the 'last' saved for the rerun is consistent.
        interrupt = InterruptAfterStep("interrupt: saving 'last' after this iteration (Ctrl-C again to stop now)")
        try:
            with interrupt:
                while self.global_iter < self.max_iter:
                    x = next(batches)
                    self.global_iter += 1
                    it = self.global_iter
                    logits, mu, logvar = self.net(x)
                    C = capacity(it, a.C_max, a.C_stop_iter)
                    loss, recon, kl = beta_vae_loss(x, logits, mu, logvar, likelihood=self.spec["likelihood"],
                                                    objective=a.objective, beta=a.beta, gamma=a.gamma, C=C,
                                                    reduction="mean")
                    loss_v, recon_v, kl_v = torch.stack([loss, recon, kl]).detach().tolist()  # one device sync
                    if not math.isfinite(loss_v):
                        raise TrainingDiverged(
                            f"training diverged at iteration {it}: loss {loss_v:.4g} (reconstruction loss "
                            f"{recon_v:.4g}, KL {kl_v:.4g}); stopped before the update, no checkpoint was "
                            f"written for it; lower --lr")
                    self.optim.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optim.step()
                    values = (recon_v, kl_v)
                    for key, v in zip(("loss", "recon", "kl"), (loss_v, recon_v, kl_v)):
                        self.history[key].append(v)
                    pbar.update(1)

                    if self.viz is not None and every(a.gather_step, it):
                        dim_kld = kl_divergence(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)  # (z_dim,)
                        self.viz.gather(it, recon, dim_kld, mu.mean(0), logvar.exp().mean(0))
                    if every(a.display_step, it):
                        self.display(C)
                        if self.viz is not None:
                            self.viz.reconstruction(x, torch.sigmoid(logits), it)
                            self.viz.send_lines()
                        self.visualize()
                        shown = it
                    if every(a.save_step, it):
                        self.save(LAST, values)
                        saved = it
                        pbar.write(f"Saved checkpoint(iter:{it})")
                    if every(a.ckpt_every, it):
                        self.save(str(it), values)
                    # Checked after every save of the step, so a Ctrl-C during one of them still gets 'last'.
                    if interrupt.requested:
                        if saved != it:
                            self.save(LAST, values)
                            pbar.write(f"Saved checkpoint(iter:{it})")
                        raise KeyboardInterrupt
        finally:
            pbar.close()
            batches.close()
        if shown != self.global_iter:
            self.display(C)
            self.visualize()
        if saved != self.global_iter:
            self.save(LAST, values)
        tqdm.write(f"[Training Finished] iter {self.global_iter}; checkpoints in {self.ckpt_dir}")
        return self

    def display(self, C):
        """The original's loss line, for the last batch."""
        recon, kl = self.history["recon"][-1], self.history["kl"][-1]
        line = f"[{self.global_iter}] recon_loss:{recon:.3f} total_kld:{kl:.3f} mean_kld:{kl / self.args.z_dim:.3f}"
        if self.args.objective == "B":
            line += f" C:{C:.3f}"
        tqdm.write(line)

    def visualize(self):
        """Latent traversals of the current network, saved (--save_output) and/or sent to visdom (--viz_on)."""
        if self.output_dir is None and self.viz is None:
            return []
        return run_traversal(self.net, self.dataset, iteration=self.global_iter, seed=self.args.seed,
                             device=self.device, output_dir=self.output_dir, viz=self.viz)

    def mean_loss(self, first=None, last=None):
        """Mean training loss over this run's history slice [first:last] (indices into ``history``)."""
        part = self.history["loss"][first:last]
        return sum(part) / len(part)
