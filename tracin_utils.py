"""VAE-TracIn engine (Kong & Chaudhuri, NeurIPS 2021).

    VAE-TracIn(x, z) = sum_c  w_c * < grad_theta l(x; theta_c), grad_theta l(z; theta_c) >
    w_c = lr * batch_size * (iter_c - iter_{c-1}) / N          (the first gap counted from iteration 0)

with l the beta-VAE loss of one sample averaged over ``reconstruct_num`` reparameterisation draws (KL in
closed form) and N the number of training samples. Self influence is the same with z = x.

How it is exact and fast:
  * per-sample gradients of a chunk of samples come from one batched pass, every draw of every sample inside it
    (``per_sample_grads``, the only gradient function): ``torch.func.vmap(grad(...))`` in general, and for
    all-Linear networks (the MNIST model) one backward with hooks whose large weight gradients stay factored
    (sum of R outer products), so dot products cost R^2 (in + out) instead of in * out and nothing of size
    n_params per sample is written to memory;
  * the reparameterisation noise of sample i, draw r at checkpoint c is a counter-based hash of
    (seed, c, set, i, r, dim): scores do not depend on chunking, order or which samples share a batch, and a
    training sample used as a test point (``--task train``) gets the same noise as in the training set;
  * checkpoints are the outer loop: each is loaded once, its test gradients computed once, and training
    gradients streamed in chunks and reduced with matrix products into float64 accumulators, so memory is
    bounded by the chunk, never by n_train x n_params.

This module knows nothing of image files or plots: it takes tensors / datasets and returns scores.
"""
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from Beta_VAE.checkpoint import (CheckpointError, atomic_torch_save, checkpoint_gaps, list_checkpoints,
                                 load_checkpoint, load_model, optimizer_kind, optimizer_lr)
from Beta_VAE.dataset import dataset_spec
from Beta_VAE.losses import beta_vae_loss, capacity, original_tracin_loss

log = logging.getLogger(__name__)

TRAIN_SET, TEST_SET = 0, 1
LOSSES = ("train", "original")
# The original code's constants, used for checkpoints that do not record their optimiser settings.
ORIGINAL_BATCH_SIZE = 64


def original_lr(dataset: str) -> float:
    return 3e-4 if dataset.lower().startswith("cifar") else 1e-4


@dataclass
class TracInConfig:
    """What defines a VAE-TracIn score, besides the data and the checkpoints."""

    dataset: str
    """Dataset name the model was trained on (decides likelihood and, for checkpoints without config, model)."""
    z_dim: int
    """Latent dimension (checked against the checkpoint's config)."""
    beta: float
    """beta of the beta-VAE loss (checked against the checkpoint's config)."""
    reconstruct_num: int = 16
    """Reparameterisation draws the loss of one sample is averaged over."""
    use_last_layer: int = 0
    """If k > 0, gradients only of the last k parameter tensors of the encoder and of the decoder."""
    loss: str = "train"
    """'train': the model's training objective; 'original': the original code's (sigmoid-MSE + beta KL)/12288."""
    seed: int = 0
    """Seed of the reparameterisation noise."""
    chunk_size: Optional[int] = None
    """Samples per vectorised gradient computation; None picks one from memory_budget_mb."""
    memory_budget_mb: Optional[int] = None
    """Target working set of one chunk (per-sample gradients and activations of all draws); None: 256 MiB on a
    CPU, where larger working sets fall out of cache and cost page faults (measured: the conv model is 4x slower
    with 1 GiB chunks than with 200 MiB ones on 2 cores), and 2 GiB on a GPU."""
    model: Optional[str] = None
    """Architecture ('H', 'B', 'MNIST') for checkpoints without config; None: MNIST for mnist*, else H."""
    lr: Optional[float] = None
    """Learning rate for w_c; None: read from each checkpoint, else the original constants."""
    batch_size: Optional[int] = None
    """Batch size for w_c; None: read from each checkpoint, else 64."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if self.reconstruct_num < 1:
            raise ValueError(f"reconstruct_num must be >= 1; got {self.reconstruct_num}")
        if self.use_last_layer < 0:
            raise ValueError(f"use_last_layer must be >= 0; got {self.use_last_layer}")

    def fingerprint(self, **extra) -> str:
        """Hash of everything that changes scores (not chunk size / memory), for caches and resumes."""
        keys = ("dataset", "z_dim", "beta", "reconstruct_num", "use_last_layer", "loss", "seed", "lr",
                "batch_size", "model")
        blob = json.dumps({**{k: getattr(self, k) for k in keys}, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TracInCheckpoint:
    """A loaded checkpoint with what its TracIn term needs."""

    iteration: int
    path: Path
    net: torch.nn.Module
    lr: float
    batch_size: int
    weight: float
    loss_fn: callable = field(repr=False)


@dataclass
class InfluenceResult:
    """Scores and orderings. influences: (n_train,) for self influence or (n_test, n_train); float64.
    helpful: indices by decreasing influence (proponents first); harmful: by increasing (opponents first)."""

    influences: np.ndarray
    helpful: np.ndarray
    harmful: np.ndarray
    checkpoints: list


def order_by_influence(influences):
    """Stable orderings along the last axis: (helpful = decreasing, harmful = increasing)."""
    influences = np.asarray(influences)
    return np.argsort(-influences, axis=-1, kind="stable"), np.argsort(influences, axis=-1, kind="stable")


# ------------------------------------------------------------------------------------------------ noise
def _to_signed(c):
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN, _MIX1, _MIX2 = (_to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x, k):
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x):
    # Wrapping int64 arithmetic: the same bits on every device.
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def reparam_noise(seed, iteration, set_id, ids, reconstruct_num, z_dim, device="cpu", dtype=torch.float32):
    """Standard-normal noise, a pure function of (seed, checkpoint iteration, set, sample id, draw, dim).

    ids: int64 (B,) sample ids within their set. Returns (B, reconstruct_num, z_dim).
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1, 1, 1)
    key = _splitmix64(torch.tensor([seed], dtype=torch.long, device=device))
    for part in (iteration, set_id):
        key = _splitmix64(key ^ part)
    key = _splitmix64(key.reshape(1, 1, 1) ^ ids)  # (B, 1, 1)
    draw = torch.arange(reconstruct_num, device=device).reshape(1, -1, 1)
    dim = torch.arange(z_dim, device=device).reshape(1, 1, -1)
    counter = _splitmix64(key ^ (draw * 1_000_003 + dim * 2))
    bits_a, bits_b = _splitmix64(counter), _splitmix64(counter ^ 1)
    # Top 53 bits -> uniform in (0, 1] and [0, 1); Box-Muller in float64.
    u1 = (_shr(bits_a, 11).double() + 1.0) * 2.0 ** -53
    u2 = _shr(bits_b, 11).double() * 2.0 ** -53
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)


# ------------------------------------------------------------------------------------------ loss, grads
def make_loss_fn(cfg: TracInConfig, train_config: dict, iteration: int):
    """Per-sample TracIn loss l(x; theta) at a checkpoint: (x, logits (B,R,C,H,W), mu, logvar) -> (B,)."""
    if cfg.loss == "original":
        return lambda x, logits, mu, logvar: original_tracin_loss(x, logits, mu, logvar, beta=cfg.beta)
    likelihood = train_config.get("likelihood") or dataset_spec(cfg.dataset)["likelihood"]
    objective = train_config.get("objective", "H")
    C = 0.0
    if objective == "B":
        C = capacity(iteration, train_config.get("C_max", 25.0), train_config.get("C_stop_iter", 1e5))
    gamma = train_config.get("gamma", 1000.0)

    def loss_fn(x, logits, mu, logvar):
        return beta_vae_loss(x, logits, mu, logvar, likelihood=likelihood, objective=objective,
                             beta=cfg.beta, gamma=gamma, C=C, reduction="none")[0]
    return loss_fn


def tracin_parameter_names(net, use_last_layer=0):
    """Names of the parameters TracIn differentiates: all, or the last k tensors of encoder and of decoder."""
    enc = [f"encoder.{n}" for n, p in net.encoder.named_parameters() if p.requires_grad]
    dec = [f"decoder.{n}" for n, p in net.decoder.named_parameters() if p.requires_grad]
    if use_last_layer > 0:
        return enc[-use_last_layer:] + dec[-use_last_layer:]
    return enc + dec


def per_sample_loss(net, x, eps, loss_fn):
    """x: (B, C, H, W); eps: (B, R, z_dim) -> per-sample loss averaged over the R draws, (B,). No gradients."""
    with torch.no_grad():
        logits, mu, logvar = net(x, eps)
        return loss_fn(x, logits, mu, logvar)


class LowRankGrad(NamedTuple):
    """Per-sample gradient of a Linear layer's weight, kept as factors: sum_r outer(g[b, r], a[b, r]).

    g: (B, R, out) gradients of the layer's outputs, a: (B, R, in) its inputs, for the R positions at which
    sample b passes through the layer (1 in the encoder, reconstruct_num in the decoder). Dot products and
    norms come from R x R Gram matrices, so the (B, out, in) gradient is never written to memory.
    """

    g: torch.Tensor
    a: torch.Tensor

    def dense(self):
        """(B, out, in)."""
        return torch.einsum("bro,bri->boi", self.g, self.a)


def _linear_owners(net, names):
    """{module name: nn.Linear} owning ``names``, or None when any of them belongs to another kind of layer."""
    owners = {}
    for name in names:
        module_name = name.rsplit(".", 1)[0]
        module = net.get_submodule(module_name)
        if type(module) is not torch.nn.Linear:
            return None
        owners[module_name] = module
    return owners


def _keep_factored(rank, linear):
    """Factors are cheaper than the dense gradient in a dot product when rank^2 (in + out) < in * out."""
    return rank * rank * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features


def _linear_per_sample_grads(net, names, owners, x, eps, loss_fn):
    """Per-sample gradients of an all-Linear parameter set from ONE batched forward/backward.

    Samples do not interact in these networks (no batch norm; eval mode), so the gradient of the summed
    per-sample losses w.r.t. a layer's output holds each sample's own output gradients; with the layer's inputs
    they give each sample's weight gradient (a sum of R outer products) and bias gradient.
    """
    captured = {}

    def capture(key):
        def hook(module, inputs, output):
            captured[key] = (inputs[0], output)
        return hook

    handles = [module.register_forward_hook(capture(key)) for key, module in owners.items()]
    try:
        with torch.enable_grad():
            logits, mu, logvar = net(x, eps)
            total = loss_fn(x, logits, mu, logvar).sum()
            out_grads = torch.autograd.grad(total, [captured[key][1] for key in owners])
    finally:
        for handle in handles:
            handle.remove()
    n = x.shape[0]
    factors = {}
    for (key, module), g in zip(owners.items(), out_grads):
        a = captured[key][0].detach().reshape(n, -1, module.in_features)
        factors[key] = (g.reshape(n, -1, module.out_features), a)
    grads = {}
    for name in names:
        key, kind = name.rsplit(".", 1)
        g, a = factors[key]
        if kind == "bias":
            grads[name] = g.sum(1)
        else:
            factored = LowRankGrad(g, a)
            grads[name] = factored if _keep_factored(g.shape[1], owners[key]) else factored.dense()
    return grads


def _vmap_per_sample_grads(net, names, x, eps, loss_fn):
    all_params = dict(net.named_parameters())
    frozen = {n: p.detach() for n, p in all_params.items() if n not in names}
    trainable = {n: all_params[n].detach() for n in names}

    def one_sample_loss(params, x1, eps1):
        logits, mu, logvar = functional_call(net, {**frozen, **params}, (x1.unsqueeze(0), eps1.unsqueeze(0)))
        return loss_fn(x1.unsqueeze(0), logits, mu, logvar)[0]

    return vmap(grad(one_sample_loss), in_dims=(None, 0, 0))(trainable, x, eps)


def per_sample_grads(net, names, x, eps, loss_fn, factored=True):
    """Gradients of each sample's loss w.r.t. the parameters ``names``; the one per-sample gradient function.

    x: (B, C, H, W); eps: (B, R, z_dim) fixed noise. Returns {name: (B, *param.shape)}, detached. When every
    parameter belongs to an nn.Linear (the MNIST model), they come from one batched backward with hooks and,
    if ``factored``, large weight gradients stay as LowRankGrad factors; otherwise (convolutions) from
    ``torch.func.vmap(grad(...))`` over the samples, every draw of a sample in one batched pass.
    """
    owners = _linear_owners(net, names)
    if owners is None:
        return _vmap_per_sample_grads(net, names, x, eps, loss_fn)
    grads = _linear_per_sample_grads(net, names, owners, x, eps, loss_fn)
    if not factored:
        grads = {n: g.dense() if isinstance(g, LowRankGrad) else g for n, g in grads.items()}
    return grads


def _dot(ga, gb):
    """(A, B) dot products of per-sample gradients of one parameter, dense or factored."""
    if isinstance(ga, LowRankGrad) and isinstance(gb, LowRankGrad):
        (n_a, r_a, _), (n_b, r_b, _) = ga.g.shape, gb.g.shape
        gg = ga.g.reshape(n_a * r_a, -1) @ gb.g.reshape(n_b * r_b, -1).T
        aa = ga.a.reshape(n_a * r_a, -1) @ gb.a.reshape(n_b * r_b, -1).T
        return (gg * aa).reshape(n_a, r_a, n_b, r_b).sum((1, 3))
    ga = ga.dense() if isinstance(ga, LowRankGrad) else ga
    gb = gb.dense() if isinstance(gb, LowRankGrad) else gb
    return ga.flatten(1) @ gb.flatten(1).T


def _sq_norm(g):
    if isinstance(g, LowRankGrad):
        return ((g.g @ g.g.transpose(1, 2)) * (g.a @ g.a.transpose(1, 2))).sum((1, 2))
    # One fused pass over the gradient: these tensors are large and the reduction is memory-bound.
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def grad_dot(grads_a, grads_b):
    """<g_a[i], g_b[j]> summed over parameters: per-sample gradient dicts of A and B samples -> (A, B)."""
    return sum(_dot(grads_a[n], grads_b[n]) for n in grads_a)


def grad_sq_norm(grads):
    """||g[i]||^2 summed over parameters: per-sample gradient dict of B samples -> (B,)."""
    return sum(_sq_norm(g) for g in grads.values())


def concat_grads(parts):
    """Concatenate per-sample gradient dicts along the sample axis."""
    first = parts[0]
    return {n: (LowRankGrad(torch.cat([p[n].g for p in parts]), torch.cat([p[n].a for p in parts]))
                if isinstance(first[n], LowRankGrad) else torch.cat([p[n] for p in parts])) for n in first}


# --------------------------------------------------------------------------------------------- checkpoints
def find_checkpoints(folder, suffix="", last_epoch=False):
    """[(iteration, path)] of the numbered checkpoints in ``folder``, sorted numerically (see list_checkpoints)."""
    found = list_checkpoints(folder, suffix=suffix, last_epoch=last_epoch)
    iterations = [it for it, _ in found]
    if len(set(iterations)) != len(iterations):
        dup = sorted({it for it in iterations if iterations.count(it) > 1})
        raise CheckpointError(f"checkpoint folder {folder} has several files for iteration(s) {dup}")
    return found


def _check_against(config, cfg, path):
    """Recorded training settings must agree with what TracIn was asked for."""
    dataset = config.get("dataset")
    if dataset is not None and dataset.lower() != cfg.dataset.lower():
        raise CheckpointError(f"checkpoint {path} was trained on --dataset {dataset}, not {cfg.dataset}")
    if config.get("z_dim") is not None and int(config["z_dim"]) != int(cfg.z_dim):
        raise CheckpointError(f"checkpoint {path} has z_dim {config['z_dim']}, but --latent_dim is {cfg.z_dim}")
    if config.get("beta") is not None and float(config["beta"]) != float(cfg.beta):
        raise CheckpointError(f"checkpoint {path} was trained with beta {config['beta']}, but --beta is {cfg.beta}")


def checkpoint_weight(lr, batch_size, gap, n_train):
    """w_c = lr * batch_size * gap / N: the TracIn weight of a checkpoint covering ``gap`` SGD iterations."""
    return float(lr) * int(batch_size) * gap / n_train


def load_tracin_checkpoint(iteration, path, gap, n_train, cfg, device="cpu", dtype=torch.float32):
    """Load one checkpoint as a TracInCheckpoint: network in eval mode, lr, batch size, w_c and loss."""
    state = load_checkpoint(path)
    config = state.get("config") or {}
    _check_against(config, cfg, path)
    spec = dataset_spec(cfg.dataset)
    default_model = "MNIST" if spec["base"] == "mnist" else "H"
    net, _ = load_model(path, model=None if config else (cfg.model or default_model),
                        z_dim=None if config else cfg.z_dim, nc=None if config else spec["nc"],
                        device=device, dtype=dtype)
    if optimizer_kind(state) == "adam":
        warnings.warn(f"checkpoint {path} was trained with Adam; TracIn's weights lr * batch * gap / N assume SGD",
                      UserWarning, stacklevel=2)
    lr = cfg.lr if cfg.lr is not None else optimizer_lr(state)
    if lr is None:
        lr = original_lr(cfg.dataset)
        log.warning("checkpoint %s records no learning rate: using the original's %g", path, lr)
    batch_size = cfg.batch_size if cfg.batch_size is not None else config.get("batch_size")
    if batch_size is None:
        batch_size = ORIGINAL_BATCH_SIZE
        log.warning("checkpoint %s records no batch size: using the original's %d", path, batch_size)
    weight = checkpoint_weight(lr, batch_size, gap, n_train)
    return TracInCheckpoint(iteration=iteration, path=Path(path), net=net, lr=float(lr),
                            batch_size=int(batch_size), weight=float(weight),
                            loss_fn=make_loss_fn(cfg, config, iteration))


def checkpoint_schedule(checkpoints):
    """[(iteration, path)] -> [(iteration, path, gap)]."""
    return [(it, p, gap) for (it, p), gap in zip(checkpoints, checkpoint_gaps([it for it, _ in checkpoints]))]


# ------------------------------------------------------------------------------------------------ engine
def _activation_numel(net, reconstruct_num):
    """Floats of the layer outputs one sample produces in a TracIn forward pass: the encoder's once, the decoder's
    once per draw (found with a forward pass of one blank image)."""
    counts = {"encoder": 0, "decoder": 0}

    def counter(part):
        def hook(module, inputs, output):
            counts[part] += output.numel()
        return hook

    handles = [module.register_forward_hook(counter(part)) for part in counts
               for module in getattr(net, part) if not list(module.children())]
    param = next(net.parameters())
    try:
        with torch.no_grad():
            net(torch.zeros((1,) + tuple(net.input_shape), device=param.device, dtype=param.dtype),
                torch.zeros(1, 1, net.z_dim, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return counts["encoder"] + reconstruct_num * counts["decoder"]


def _auto_chunk_size(net, names, cfg, dtype):
    """Samples per chunk so that a chunk's working set (per-sample gradients, activations of every draw, and the
    copies backward and the products make) fits memory_budget_mb; at most 256."""
    if cfg.chunk_size:
        return int(cfg.chunk_size)
    params = dict(net.named_parameters())
    owners = _linear_owners(net, names)
    grad_numel = 0
    for name in names:
        module = owners and owners[name.rsplit(".", 1)[0]]
        if module is not None and name.endswith("weight"):
            rank = cfg.reconstruct_num if name.startswith("decoder") else 1
            grad_numel += (rank * (module.in_features + module.out_features) if _keep_factored(rank, module)
                           else params[name].numel())
        else:
            grad_numel += params[name].numel()
    budget_mb = cfg.memory_budget_mb
    if budget_mb is None:
        budget_mb = 2048 if next(net.parameters()).device.type == "cuda" else 256
    itemsize = torch.finfo(dtype).bits // 8
    # About three copies of each alive at once (forward values, their gradients, products / autograd buffers).
    per_sample = 3 * (grad_numel + _activation_numel(net, cfg.reconstruct_num)) * itemsize
    return int(max(1, min(256, budget_mb * 2 ** 20 // per_sample)))


def _batches(data, indices, chunk):
    """Yield (positions, images) for chunks of ``indices`` of a dataset with get_batch, or a tensor."""
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        if torch.is_tensor(data):
            yield idx, data[idx]
        else:
            yield idx, data.get_batch(idx)[0]


def _grads_for(ckpt, names, images, ids, set_id, cfg, device, dtype):
    eps = reparam_noise(cfg.seed, ckpt.iteration, set_id, ids, cfg.reconstruct_num, ckpt.net.z_dim,
                        device=device, dtype=dtype)
    return per_sample_grads(ckpt.net, names, images.to(device=device, dtype=dtype), eps, ckpt.loss_fn)


class _Cache:
    """Per-checkpoint gradient products on disk, so an interrupted run resumes after its finished checkpoints.

    An entry holds the *unweighted* products of one checkpoint with its lr and batch size, so the weight w_c is
    recomputed from the current checkpoint schedule (another --ckpt_suffix or an added checkpoint changes the gaps).
    It is reused only for the same score key (settings, data, test points) and the same checkpoint file (size
    and modification time), so a retrained or replaced checkpoint is never served from a stale entry.
    """

    def __init__(self, folder, key):
        self.folder = Path(folder) if folder else None
        self.key = key

    def _path(self, iteration):
        return self.folder / f"ckpt_{iteration}.pt"

    @staticmethod
    def _entry_key(key, checkpoint_path):
        stat = Path(checkpoint_path).stat()
        return f"{key}:{stat.st_size}:{stat.st_mtime_ns}"

    def get(self, iteration, checkpoint_path):
        """(products, lr, batch_size) cached for this checkpoint, or None."""
        if self.folder is None or not self._path(iteration).is_file():
            return None
        try:
            blob = torch.load(self._path(iteration), map_location="cpu", weights_only=True)
        except Exception:
            log.warning("ignoring unreadable cache file %s", self._path(iteration))
            return None
        if not isinstance(blob, dict) or blob.get("key") != self._entry_key(self.key, checkpoint_path):
            return None
        return blob["products"], blob["lr"], blob["batch_size"]

    def put(self, iteration, checkpoint_path, products, lr, batch_size):
        if self.folder is not None:
            atomic_torch_save({"key": self._entry_key(self.key, checkpoint_path), "products": products,
                               "lr": lr, "batch_size": batch_size}, self._path(iteration))


def _run(train_data, checkpoints, cfg, n_rows, products_fn, cache_dir, cache_key, device, dtype, progress):
    """Checkpoint-outer accumulation shared by self and pairwise influence: sum_c w_c * products_fn(checkpoint c)."""
    n_train = len(train_data)
    if n_train == 0:
        raise ValueError("the training set is empty")
    schedule = checkpoint_schedule(checkpoints)
    total = torch.zeros((n_rows, n_train) if n_rows else (n_train,), dtype=torch.float64)
    cache = _Cache(cache_dir, cache_key)
    summaries = []
    for iteration, path, gap in tqdm(schedule, desc="checkpoints", disable=not progress):
        cached = cache.get(iteration, path)
        if cached is not None:
            log.info("checkpoint %d: reusing cached contribution", iteration)
            products, lr, batch_size = cached
        else:
            ckpt = load_tracin_checkpoint(iteration, path, gap, n_train, cfg, device=device, dtype=dtype)
            products, lr, batch_size = products_fn(ckpt), ckpt.lr, ckpt.batch_size
            cache.put(iteration, path, products, lr, batch_size)
            del ckpt
        weight = checkpoint_weight(lr, batch_size, gap, n_train)
        summaries.append({"iteration": iteration, "path": str(path), "lr": lr, "batch_size": batch_size,
                          "weight": weight})
        total += weight * products
    influences = total.numpy()
    helpful, harmful = order_by_influence(influences)
    return InfluenceResult(influences=influences, helpful=helpful, harmful=harmful, checkpoints=summaries)


def _data_key(data, cache_tag):
    """What identifies a set of samples for the cache: the caller's tag (e.g. dataset, sizes and data folder),
    else a digest of an image tensor, else the dataset's name and layout."""
    if cache_tag is not None:
        return cache_tag
    if torch.is_tensor(data):
        return hashlib.sha256(data.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]
    return [getattr(data, "name", type(data).__name__), len(data), getattr(data, "n_extra", 0)]


def self_influence(train_data, checkpoints, cfg: TracInConfig, *, device="cpu", dtype=torch.float32,
                   cache_dir=None, cache_tag=None, progress=True):
    """VAE-TracIn(x_i, x_i) for every training sample.

    train_data: a dataset with ``get_batch`` (Beta_VAE.dataset) or an image tensor (N, C, H, W).
    checkpoints: [(iteration, path)] from find_checkpoints. cache_dir: folder for per-checkpoint partial results
    (resume after an interruption); cache_tag: what identifies train_data there (JSON-able; default: a digest of
    a tensor, or the dataset's name and sizes). Returns InfluenceResult with influences (N,).
    """
    n_train = len(train_data)
    all_ids = torch.arange(n_train)

    def products(ckpt):
        names = tracin_parameter_names(ckpt.net, cfg.use_last_layer)
        chunk = _auto_chunk_size(ckpt.net, names, cfg, dtype)
        out = torch.zeros(n_train, dtype=torch.float64)
        for idx, images in tqdm(_batches(train_data, all_ids, chunk), total=math.ceil(n_train / chunk),
                                desc=f"self influence @{ckpt.iteration}", leave=False, disable=not progress):
            grads = _grads_for(ckpt, names, images, idx, TRAIN_SET, cfg, device, dtype)
            out[idx] = grad_sq_norm(grads).double().cpu()
        return out

    key = cfg.fingerprint(kind="self", n_train=n_train, data=_data_key(train_data, cache_tag))
    return _run(train_data, checkpoints, cfg, 0, products, cache_dir, key, device, dtype, progress)


def pairwise_influence(test_images, train_data, checkpoints, cfg: TracInConfig, *, test_train_indices=None,
                       device="cpu", dtype=torch.float32, cache_dir=None, cache_tag=None, progress=True):
    """VAE-TracIn(x_i, z_j) for every training sample x_i and test image z_j.

    test_images: (T, C, H, W). test_train_indices: when the test images are training samples (sanity check),
    their indices in train_data, so that they get the training samples' noise and TracIn(x_i, x_i) here equals
    self influence exactly. cache_dir / cache_tag as in self_influence. Returns InfluenceResult with influences
    (T, N) and orderings per test image.
    """
    test_images = torch.as_tensor(test_images)
    n_test, n_train = len(test_images), len(train_data)
    if test_train_indices is not None:
        test_ids, test_set = torch.as_tensor(test_train_indices, dtype=torch.long), TRAIN_SET
        if len(test_ids) != n_test:
            raise ValueError(f"test_train_indices has {len(test_ids)} entries for {n_test} test images")
    else:
        test_ids, test_set = torch.arange(n_test), TEST_SET
    all_ids = torch.arange(n_train)

    def products(ckpt):
        names = tracin_parameter_names(ckpt.net, cfg.use_last_layer)
        chunk = _auto_chunk_size(ckpt.net, names, cfg, dtype)
        test_parts = [_grads_for(ckpt, names, test_images[s:s + chunk], test_ids[s:s + chunk], test_set, cfg,
                                 device, dtype) for s in range(0, n_test, chunk)]
        test_grads = concat_grads(test_parts)
        del test_parts
        out = torch.zeros(n_test, n_train, dtype=torch.float64)
        for idx, images in tqdm(_batches(train_data, all_ids, chunk), total=math.ceil(n_train / chunk),
                                desc=f"influence @{ckpt.iteration}", leave=False, disable=not progress):
            grads = _grads_for(ckpt, names, images, idx, TRAIN_SET, cfg, device, dtype)
            out[:, idx] = grad_dot(test_grads, grads).double().cpu()
        return out

    test_digest = hashlib.sha256(test_images.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]
    key = cfg.fingerprint(kind="pairwise", n_train=n_train, data=_data_key(train_data, cache_tag),
                          test=test_digest, test_set=test_set, test_ids=test_ids.tolist())
    return _run(train_data, checkpoints, cfg, n_test, products, cache_dir, key, device, dtype, progress)


def sample_losses(data, checkpoint_path, cfg: TracInConfig, *, iteration=None, device="cpu",
                  dtype=torch.float32, chunk=256, progress=True):
    """The TracIn loss l(x_i; theta) of every sample at one checkpoint (e.g. for self influence vs -ELBO).

    data: dataset with get_batch or tensor (N, C, H, W). Returns float64 numpy (N,). Uses the same noise as
    the training samples' gradients at that checkpoint.
    """
    iteration = int(Path(checkpoint_path).name) if iteration is None else iteration
    ckpt = load_tracin_checkpoint(iteration, checkpoint_path, 0, max(len(data), 1), cfg, device=device,
                                  dtype=dtype)
    out = torch.zeros(len(data), dtype=torch.float64)
    for idx, images in tqdm(_batches(data, torch.arange(len(data)), chunk), total=math.ceil(len(data) / chunk),
                            desc="losses", leave=False, disable=not progress):
        eps = reparam_noise(cfg.seed, iteration, TRAIN_SET, idx, cfg.reconstruct_num, ckpt.net.z_dim,
                            device=device, dtype=dtype)
        out[idx] = per_sample_loss(ckpt.net, images.to(device=device, dtype=dtype), eps, ckpt.loss_fn).double().cpu()
    return out.numpy()
