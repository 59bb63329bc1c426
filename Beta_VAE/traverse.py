"""Visual outputs of training: latent traversals saved as JPEG grids and GIFs (Pillow), and optional visdom.

A traversal (as in the original Beta-VAE code) takes a code z, sets one latent dimension at a time to each value
of ``INTERPOLATION`` (-3 ... 3 in steps of 2/3, 10 values) and decodes it. It is done for three codes: the
posterior mean of a fixed training image (index 0), of a random training image, and a random z. For each code
``<key>_<j>.jpg`` shows all latent dimensions at the j-th value (one row, as the original), ``<key>.gif`` cycles
through the values, and ``<key>_traversal.jpg`` is the whole grid (one row per dimension).

Nothing here computes a loss or trains: it only consumes a network and a dataset.
"""
import logging
from pathlib import Path

import torch
from torchvision.utils import make_grid

log = logging.getLogger(__name__)

LIMIT, STEP = 3, 2 / 3
INTERPOLATION = torch.arange(-LIMIT, LIMIT + 0.1, STEP)  # 10 values: -3, -2.33, ..., 3
KEYS = ("fixed_img", "random_img", "random_z")
GIF_FRAME_MS = 100  # the original's `convert -delay 10` (hundredths of a second)

VISDOM_INSTALL = ('visdom is not installed; install it with: pip install "setuptools<81" wheel && '
                  'pip install --no-build-isolation visdom, start its server with: python -m visdom.server, '
                  'or run with --viz_on False')


# ---------------------------------------------------------------------------------------------- traversal
@torch.no_grad()
def traverse(net, z, values=INTERPOLATION):
    """Decode z with each latent dimension set in turn to each value.

    z: (z_dim,) or (1, z_dim). Returns pixel means (n_values, z_dim, C, H, W) in [0, 1]:
    ``out[j, d]`` is z with dimension d set to ``values[j]``.
    """
    z = z.reshape(-1)
    z_dim = z.numel()
    values = values.to(z)
    codes = z.repeat(len(values), z_dim, 1)                      # (V, z_dim, z_dim)
    dims = torch.arange(z_dim, device=z.device)
    codes[:, dims, dims] = values[:, None].expand(-1, z_dim)     # the diagonal: dimension d of row d
    images = torch.sigmoid(net.decode(codes.reshape(-1, z_dim)))
    return images.reshape(len(values), z_dim, *images.shape[1:])


@torch.no_grad()
def traversal_codes(net, dataset, *, generator, device):
    """The three codes of the original: {'fixed_img', 'random_img', 'random_z'} -> (1, z_dim).

    Images are encoded to their posterior mean. The random image and z come from ``generator`` (a CPU
    torch.Generator), so traversals never disturb the training random stream. As the original, the random z is
    uniform in [0, 1) (``torch.rand``), not drawn from the prior.
    """
    random_idx = int(torch.randint(1, max(len(dataset), 2), (1,), generator=generator)) % len(dataset)
    images = dataset.get_batch([0, random_idx])[0].to(device)
    mu, _ = net.encode(images)
    random_z = torch.rand(1, net.z_dim, generator=generator).to(device)
    return {"fixed_img": mu[:1], "random_img": mu[1:2], "random_z": random_z}


def _to_pil(grid):
    """grid (C, H, W) float in [0, 1] -> PIL image (what torchvision's save_image does)."""
    from PIL import Image
    array = grid.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def grid2gif(frames, path, duration=GIF_FRAME_MS):
    """Write PIL images ``frames`` as a looping GIF with Pillow (the original shelled out to ImageMagick)."""
    from PIL import Image
    first, *rest = [f.convert("P", palette=Image.Palette.ADAPTIVE, colors=256) if f.mode == "RGB" else f
                    for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=duration, loop=0)


def save_traversals(samples, out_dir):
    """Save traversals as JPEG grids and GIFs in ``out_dir``.

    samples: {key: (n_values, z_dim, C, H, W)} from ``traverse``. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, images in samples.items():
        n_values, z_dim = images.shape[:2]
        frames = []
        for j in range(n_values):
            # One row of all latent dimensions at value j, white padding, as the original's save_image call.
            frame = _to_pil(make_grid(images[j], nrow=z_dim, pad_value=1))
            path = out_dir / f"{key}_{j}.jpg"
            frame.save(path, quality=95)
            frames.append(frame)
            written.append(path)
        path = out_dir / f"{key}.gif"
        grid2gif(frames, path)
        written.append(path)
        # The whole traversal: one row per dimension, one column per value (what visdom shows).
        path = out_dir / f"{key}_traversal.jpg"
        _to_pil(make_grid(images.transpose(0, 1).flatten(0, 1), nrow=n_values, pad_value=1)).save(path, quality=95)
        written.append(path)
    return written


def run_traversal(net, dataset, *, iteration, seed, device, output_dir=None, viz=None):
    """Traverse the three codes of ``net``, save them under ``output_dir/<iteration>/`` and/or send them to visdom.

    Returns the paths written (empty without ``output_dir``).
    """
    was_training = net.training
    net.eval()
    try:
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(iteration))
        codes = traversal_codes(net, dataset, generator=generator, device=device)
        samples = {key: traverse(net, z).cpu() for key, z in codes.items()}
    finally:
        net.train(was_training)
    if viz is not None:
        viz.traversals(samples, iteration)
    if output_dir is None:
        return []
    written = save_traversals(samples, Path(output_dir) / str(iteration))
    log.info("saved latent traversals to %s", Path(output_dir) / str(iteration))
    return written


# ------------------------------------------------------------------------------------------------ visdom
class Visdom:
    """The original's visdom plots: reconstructions, loss / KL / mu / var lines and traversals.

    visdom is imported only here; a missing package or an unreachable server is a SystemExit with one line.
    ``win_states`` restores the window ids saved in a checkpoint.
    """

    def __init__(self, name, port, z_dim, win_states=None, module=None):
        if module is None:
            try:
                import visdom as module
            except ImportError:
                raise SystemExit(f"error: --viz_on True: {VISDOM_INSTALL}") from None
        try:
            self.viz = module.Visdom(port=port, raise_exceptions=True)
            connected = self.viz.check_connection(timeout_seconds=3)
        except Exception:  # visdom raises ConnectionError, requests' errors, ... depending on its version
            connected = False
        if not connected:
            raise SystemExit(f"error: --viz_on True: no visdom server at localhost:{port}; start one with "
                             f"`python -m visdom.server -port {port}` or run with --viz_on False")
        self.name, self.z_dim = name, z_dim
        self.wins = {"recon": None, "kld": None, "mu": None, "var": None}
        self.wins.update({k: v for k, v in (win_states or {}).items() if k in self.wins})
        self.flush()

    def flush(self):
        self.lines = {"iter": [], "recon": [], "kld": [], "mu": [], "var": []}

    def gather(self, iteration, recon, dim_kld, mu, var):
        """Record one point of the lines: recon (), dim_kld / mu / var (z_dim,) batch means."""
        self.lines["iter"].append(iteration)
        self.lines["recon"].append(recon.detach().reshape(1).cpu())
        kld = dim_kld.detach().cpu()
        self.lines["kld"].append(torch.cat([kld, kld.mean().reshape(1), kld.sum().reshape(1)]))
        self.lines["mu"].append(mu.detach().cpu())
        self.lines["var"].append(var.detach().cpu())

    def reconstruction(self, x, x_recon, iteration):
        """x, x_recon: (B, C, H, W) images and their reconstructions in [0, 1]; the first 100 of each."""
        grids = [make_grid(t[:100].detach().cpu(), normalize=True) for t in (x, x_recon)]
        self.viz.images(torch.stack(grids), env=self.name + "_reconstruction", opts=dict(title=str(iteration)),
                        nrow=10)

    def send_lines(self):
        if not self.lines["iter"]:
            return
        iters = torch.tensor(self.lines["iter"], dtype=torch.float32)
        legend = [f"z_{j}" for j in range(self.z_dim)]
        specs = {"recon": ("reconstruction loss", None), "kld": ("kl divergence", legend + ["mean", "total"]),
                 "mu": ("posterior mean", legend), "var": ("posterior variance", legend)}
        for key, (title, keys) in specs.items():
            opts = dict(width=400, height=400, xlabel="iteration", title=title)
            if keys:
                opts["legend"] = keys
            y = torch.stack(self.lines[key])
            x = iters if y.shape[1] == 1 else iters[:, None].expand_as(y)
            kwargs = dict(X=x, Y=y, env=self.name + "_lines", opts=opts)
            if self.wins[key] is not None:
                kwargs.update(win=self.wins[key], update="append")
            self.wins[key] = self.viz.line(**kwargs)
        self.flush()

    def traversals(self, samples, iteration):
        for key, images in samples.items():
            n_values = images.shape[0]
            self.viz.images(images.transpose(0, 1).flatten(0, 1), env=self.name + "_traverse",
                            opts=dict(title=f"{key}_latent_traversal(iter:{iteration})"), nrow=n_values)
