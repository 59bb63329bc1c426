"""Figures, image grids and headline numbers of the VAE-TracIn scripts.

Everything here consumes scores, orderings, labels, latents and images and computes no influence (the original
code's ``statistics.py``, without seaborn / pandas / sklearn). matplotlib runs on the Agg backend; every file is
written to a temporary name in its folder and renamed, so a reader never sees half a figure.
"""
import logging
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from Beta_VAE.checkpoint import atomic_write  # noqa: E402

log = logging.getLogger(__name__)

# Scatter plots of n_test x n_train points draw at most this many (a seeded random subset); the original drew
# all 7.7M of a 128 x 60000 run, which looks the same and takes minutes.
MAX_SCATTER_POINTS = 1_000_000
# gaussian_kde costs O(points x grid); the density plot fits on at most this many samples.
MAX_KDE_POINTS = 5000
CMAP = "plasma_r"


def _savefig(fig, path, **kwargs):
    with atomic_write(path) as tmp:
        fig.savefig(tmp, **kwargs)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------ images
def to_pil(image):
    """float tensor (C, H, W) in [0, 1] -> PIL image: mode L for one channel, RGB for three (as save_image)."""
    from PIL import Image
    array = image.detach().mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")


def save_image_file(image, path, quality=95):
    """One image (C, H, W) as a file (format from the suffix)."""
    with atomic_write(path) as tmp:
        to_pil(image).save(tmp, quality=quality)
    return Path(path)


def save_grid(images, path, nrow=8, pad_value=0.0):
    """images (B, C, H, W) in [0, 1] as a grid of ``nrow`` images per row (torchvision's make_grid)."""
    images = torch.as_tensor(images).detach().cpu()
    return save_image_file(make_grid(images, nrow=nrow, pad_value=pad_value), path)


def save_influence_overview(test_images, proponents, opponents, path):
    """One row per test image: the test image, a blank, its proponents, a blank, its opponents.

    test_images (T, C, H, W); proponents, opponents (T, n, C, H, W), strongest first; values in [0, 1].
    """
    test_images = torch.as_tensor(test_images).detach().cpu()
    proponents, opponents = (torch.as_tensor(a).detach().cpu() for a in (proponents, opponents))
    if proponents.shape != opponents.shape or proponents.shape[0] != len(test_images) \
            or proponents.shape[2:] != test_images.shape[1:]:
        raise ValueError(f"expected proponents and opponents of shape (T, n, C, H, W) = (T, n) + "
                         f"{tuple(test_images.shape[1:])} for {len(test_images)} test images; got "
                         f"{tuple(proponents.shape)} and {tuple(opponents.shape)}")
    blank = torch.ones_like(test_images[:, None])  # white separators between the three blocks
    rows = torch.cat([test_images[:, None], blank, proponents, blank, opponents], dim=1)
    return save_grid(rows.flatten(0, 1), path, nrow=rows.shape[1], pad_value=1.0)


def save_images(images, folder):
    """Each image (B, C, H, W) as ``folder/<i>.jpg`` (the original's generated test points)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_image_file(image, folder / f"{i}.jpg") for i, image in enumerate(images)]


# ----------------------------------------------------------------------------------------------- numbers
def normalize(influences):
    """Scale influences into [-1, 1]: divide by max(|min|, max) (the original's ``normalize``)."""
    influences = np.asarray(influences, dtype=np.float64)
    scale = max(-influences.min(), influences.max()) if influences.size else 0.0
    return influences / scale if scale > 0 else influences


def get_auc_score(inds, flip_ind):
    """Outlier detection by an ordering, as the original's ``get_auc_score(..., rescale=False)``.

    inds: training indices in decreasing outlier score (e.g. ``helpful`` of self influence); flip_ind: indices
    of the true outliers. rates[k] = fraction of the outliers among inds[:k+1]; the AUC is mean(rates).
    Returns (auc, rates (N,)).
    """
    inds = np.asarray(inds).reshape(-1)
    flip = np.asarray(list(flip_ind), dtype=np.int64)
    if len(flip) == 0:
        raise ValueError("no outlier indices to detect")
    rates = np.cumsum(np.isin(inds, flip)) / float(len(flip))
    return float(np.mean(rates)), rates


def found_after(rates, fraction):
    """Fraction of the outliers found after checking ``fraction`` of the data (at least one sample)."""
    k = min(len(rates), max(1, int(round(fraction * len(rates)))))
    return float(rates[k - 1])


def self_ranks(helpful, indices):
    """Rank (0 = strongest proponent) of training sample indices[j] in helpful[j]; helpful (T, N) -> (T,)."""
    helpful = np.asarray(helpful)
    return np.array([int(np.flatnonzero(helpful[j] == i)[0]) for j, i in enumerate(indices)])


def label_agreement(strongest, train_labels, test_labels):
    """Fraction of test images whose ``strongest`` training sample (T,) shares their label; unknown (-1) test
    labels are left out. NaN when none is known."""
    strongest, test_labels = np.asarray(strongest), np.asarray(test_labels)
    known = test_labels >= 0
    if not known.any():
        return float("nan")
    return float(np.mean(np.asarray(train_labels)[strongest[known]] == test_labels[known]))


def linear_fit(x, y):
    """Least-squares line y = a x + b and its R^2 (sklearn's LinearRegression.score). Returns (a, b, r2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = np.polyfit(x, y, 1)
    ss_res = np.sum((y - (a * x + b)) ** 2)
    ss_tot = np.sum((y - y.mean()) ** 2)
    return float(a), float(b), float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def _minmax(v):
    v = np.asarray(v, dtype=np.float64)
    span = v.max() - v.min() if v.size else 0.0
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def _subsample(n, limit, seed=0):
    """Indices of at most ``limit`` of n points (all, in order, when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------------------- self influence
def plot_detection_curve(rates, path, label="TracIn self-inf"):
    """Fraction of extra samples found vs fraction of training data checked (``AUC.png``)."""
    fig = plt.figure()
    plt.plot(np.linspace(0, 1, len(rates)), rates, label=label)
    plt.plot([0, 1], [0, 1], linestyle=":", color="gray", label="random order")
    plt.xlabel("Fraction of training data checked")
    plt.ylabel("Fraction of extra data detected")
    plt.legend(loc="lower right")
    return _savefig(fig, path)


def plot_selfinf_by_elbo(neg_losses, influences, scatter_path, kde_path):
    """Self influence (normalised) vs -loss: scatter with a linear fit (R^2 in the legend), and a density plot.

    neg_losses, influences: (N,). Returns R^2.
    """
    x = np.asarray(neg_losses, dtype=np.float64).reshape(-1)
    y = normalize(influences).reshape(-1)
    a, b, r2 = linear_fit(x, y)
    x_new = np.linspace(x.min(), x.max(), 100)

    fig, ax = plt.subplots(figsize=(4, 2))
    ax.scatter(x, y, s=0.5 if len(x) <= 5000 else 0.1, alpha=0.8, c=plt.get_cmap(CMAP)(_minmax(x)),
               rasterized=True)
    ax.plot(x_new, a * x_new + b, linestyle="--", label=r"linear reg ($R^2=${:.2f})".format(r2))
    ax.set_xlabel(r"$-\ell_{\beta}(x_i)$")
    ax.set_ylabel(r"VAE-TracIn($x_i$, $x_i$)")
    ax.legend(loc=1)
    ax.locator_params(axis="x", nbins=2)
    fig.tight_layout()
    _savefig(fig, scatter_path, dpi=400)
    plot_joint_kde(x, y, kde_path, xlabel=r"$-\ell_{\beta}(x_i)$", ylabel=r"TracIn($x_i$, $x_i$)")
    return r2


def plot_joint_kde(x, y, path, xlabel, ylabel):
    """A joint density plot (seaborn's ``jointplot(kind='kde')``) with scipy.stats.gaussian_kde: filled 2-D
    density contours and the two marginal densities."""
    from scipy.stats import gaussian_kde

    keep = _subsample(len(x), MAX_KDE_POINTS)
    xs, ys = np.asarray(x)[keep], np.asarray(y)[keep]
    fig = plt.figure(figsize=(6, 6))
    grid = fig.add_gridspec(2, 2, width_ratios=(5, 1), height_ratios=(1, 5), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)

    def span(v):
        pad = 0.1 * (v.max() - v.min()) or 1.0
        return np.linspace(v.min() - pad, v.max() + pad, 120)

    gx, gy = span(xs), span(ys)
    try:
        density = gaussian_kde(np.vstack([xs, ys]))
        mx, my = np.meshgrid(gx, gy)
        z = density(np.vstack([mx.ravel(), my.ravel()])).reshape(mx.shape)
        levels = np.linspace(0, z.max(), 11)[1:]  # no fill below the lowest level, as seaborn's thresh
        ax.contourf(mx, my, z, levels=levels, cmap="Blues")
        top.fill_between(gx, gaussian_kde(xs)(gx), alpha=0.5, color="tab:blue")
        right.fill_betweenx(gy, gaussian_kde(ys)(gy), alpha=0.5, color="tab:blue")
    except (np.linalg.LinAlgError, ValueError) as exc:  # fewer than 2 points or a degenerate cloud
        log.warning("density plot %s: gaussian_kde failed (%s); drawing a 2-D histogram instead", path, exc)
        ax.hist2d(xs, ys, bins=30, cmap="Blues")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for marginal in (top, right):
        marginal.axis("off")
    return _savefig(fig, path)


# ---------------------------------------------------------------------------------------- test influence
def plot_influence_by_label(influences, train_labels, test_labels, path):
    """Histograms of (normalised) influences on test images of each label: training samples of the same label
    vs of other labels, one panel per label present (``traininf_distribution.pdf``).

    influences (T, N); train_labels (N,) (-1 for extras); test_labels (T,) (-1 = unknown, left out).
    """
    influences = normalize(influences)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    present = sorted({int(v) for v in test_labels if v >= 0})
    if not present:
        log.warning("no test image has a known label: %s not drawn", path)
        return None
    nrow = 1 if len(present) == 1 else 2
    ncol = (len(present) + nrow - 1) // nrow
    fig = plt.figure(figsize=(4 * ncol, 3 * nrow))
    for panel, label in enumerate(present, start=1):
        rows = influences[test_labels == label]
        same = train_labels == label
        plt.subplot(nrow, ncol, panel)
        plt.hist(rows[:, ~same].ravel(), 150, density=True, alpha=0.6, label=r"$y_i\neq${}".format(label))
        plt.hist(rows[:, same].ravel(), 150, density=True, alpha=0.6, label=r"$y_i=${}".format(label), color="red")
        plt.legend()
        plt.yticks([])
        plt.xlabel(r"TracIn($x_i$, $z_j$) (label($z_j$)={})".format(label))
    fig.tight_layout()
    return _savefig(fig, path)


def _scatter_influences(x, influences, xlabel, path):
    x, v = np.asarray(x, dtype=np.float64).ravel(), normalize(influences).ravel()
    keep = _subsample(len(v), MAX_SCATTER_POINTS)
    x, v = x[keep], v[keep]
    fig, ax = plt.subplots()
    ax.scatter(x, v, s=0.1, alpha=0.5, c=plt.get_cmap(CMAP)(_minmax(np.abs(v))), rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"TracIn($x_i$, $z_j$)")
    return _savefig(fig, path, dpi=400)


def plot_influence_by_latent_distance(influences, latent_test, latent_train, path):
    """Influence vs ||mu(z_j) - mu(x_i)|| in latent space (``traininf_bydist.jpg``).
    influences (T, N); latent_test (T, d); latent_train (N, d)."""
    distances = torch.cdist(torch.as_tensor(latent_test, dtype=torch.float64),
                            torch.as_tensor(latent_train, dtype=torch.float64)).numpy()
    return _scatter_influences(distances, influences, r"dist($x_i$, $z_j$)", path)


def plot_influence_by_latent_norm(influences, latent_train, path):
    """Influence vs ||mu(x_i)|| of the training sample (``traininf_bylatentnorm.jpg``).
    influences (T, N); latent_train (N, d)."""
    norms = torch.as_tensor(latent_train, dtype=torch.float64).norm(dim=1).numpy()
    return _scatter_influences(np.broadcast_to(norms, np.shape(influences)), influences, r"norm($x_i$)", path)
