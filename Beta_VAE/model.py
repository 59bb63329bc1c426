"""Beta-VAE networks with the exact architectures and parameter names of the original code.

State-dict keys (``encoder.0.weight``, ``decoder.11.bias``, ...) match the checkpoints published with
VAE-TracIn, so those load unchanged. Every model maps images to decoder *logits*: apply ``sigmoid`` to get
pixel means. ``forward`` takes optional reparameterisation noise so that TracIn can fix it.
"""
import torch
import torch.nn as nn
import torch.nn.init as init

MODELS = ("H", "B", "MNIST")


class View(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, tensor):
        return tensor.reshape(self.size)


def kaiming_init(m):
    # As the original: ConvTranspose2d keeps PyTorch's default init.
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        init.kaiming_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class _BetaVAE(nn.Module):
    """Shared encode / reparameterise / decode logic. Subclasses define ``encoder`` and ``decoder``.

    ``input_shape`` is (C, H, W) of the images the model takes.
    """

    z_dim: int
    input_shape: tuple

    def weight_init(self):
        for block in (self.encoder, self.decoder):
            for m in block:
                kaiming_init(m)

    def encode(self, x):
        """x: (B, C, H, W) -> mu, logvar: (B, z_dim) each."""
        distributions = self.encoder(x)
        return distributions[:, :self.z_dim], distributions[:, self.z_dim:]

    def decode(self, z):
        """z: (B, z_dim) -> logits (B, C, H, W)."""
        return self.decoder(z).reshape(z.shape[0], *self.input_shape)

    # Names of the original code, kept for scripts written against it.
    def _encode(self, x):
        return self.encoder(x)

    def _decode(self, z):
        return self.decode(z)

    def forward(self, x, eps=None):
        """Encode, reparameterise and decode.

        x: (B, C, H, W). eps: standard-normal noise, None (one fresh draw), (B, z_dim), or (B, R, z_dim) for R
        draws per image. Returns (logits, mu, logvar): logits (B, C, H, W), or (B, R, C, H, W) when eps has
        R draws; mu and logvar (B, z_dim).
        """
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        if eps.dim() == 3:
            z = mu.unsqueeze(1) + std.unsqueeze(1) * eps  # (B, R, z_dim)
            logits = self.decode(z.reshape(-1, self.z_dim))
            return logits.reshape(x.shape[0], eps.shape[1], *self.input_shape), mu, logvar
        return self.decode(mu + std * eps), mu, logvar


class BetaVAE_H(_BetaVAE):
    """Model proposed in the original beta-VAE paper (Higgins et al., ICLR 2017). 64x64 images."""

    def __init__(self, z_dim=10, nc=3):
        super().__init__()
        self.z_dim = z_dim
        self.nc = nc
        self.input_shape = (nc, 64, 64)
        self.encoder = nn.Sequential(
            nn.Conv2d(nc, 32, 4, 2, 1),          # B,  32, 32, 32
            nn.ReLU(True),
            nn.Conv2d(32, 32, 4, 2, 1),          # B,  32, 16, 16
            nn.ReLU(True),
            nn.Conv2d(32, 64, 4, 2, 1),          # B,  64,  8,  8
            nn.ReLU(True),
            nn.Conv2d(64, 64, 4, 2, 1),          # B,  64,  4,  4
            nn.ReLU(True),
            nn.Conv2d(64, 256, 4, 1),            # B, 256,  1,  1
            nn.ReLU(True),
            View((-1, 256 * 1 * 1)),             # B, 256
            nn.Linear(256, z_dim * 2),           # B, z_dim*2
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, 256),               # B, 256
            View((-1, 256, 1, 1)),               # B, 256,  1,  1
            nn.ReLU(True),
            nn.ConvTranspose2d(256, 64, 4),      # B,  64,  4,  4
            nn.ReLU(True),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), # B,  64,  8,  8
            nn.ReLU(True),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), # B,  32, 16, 16
            nn.ReLU(True),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), # B,  32, 32, 32
            nn.ReLU(True),
            nn.ConvTranspose2d(32, nc, 4, 2, 1), # B,  nc, 64, 64
        )
        self.weight_init()


class BetaVAE_B(_BetaVAE):
    """Model proposed in 'Understanding disentangling in beta-VAE' (Burgess et al., 2018). 64x64 images."""

    def __init__(self, z_dim=10, nc=1):
        super().__init__()
        self.z_dim = z_dim
        self.nc = nc
        self.input_shape = (nc, 64, 64)
        self.encoder = nn.Sequential(
            nn.Conv2d(nc, 32, 4, 2, 1),          # B,  32, 32, 32
            nn.ReLU(True),
            nn.Conv2d(32, 32, 4, 2, 1),          # B,  32, 16, 16
            nn.ReLU(True),
            nn.Conv2d(32, 32, 4, 2, 1),          # B,  32,  8,  8
            nn.ReLU(True),
            nn.Conv2d(32, 32, 4, 2, 1),          # B,  32,  4,  4
            nn.ReLU(True),
            View((-1, 32 * 4 * 4)),              # B, 512
            nn.Linear(32 * 4 * 4, 256),          # B, 256
            nn.ReLU(True),
            nn.Linear(256, 256),                 # B, 256
            nn.ReLU(True),
            nn.Linear(256, z_dim * 2),           # B, z_dim*2
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, 256),               # B, 256
            nn.ReLU(True),
            nn.Linear(256, 256),                 # B, 256
            nn.ReLU(True),
            nn.Linear(256, 32 * 4 * 4),          # B, 512
            nn.ReLU(True),
            View((-1, 32, 4, 4)),                # B,  32,  4,  4
            nn.ConvTranspose2d(32, 32, 4, 2, 1), # B,  32,  8,  8
            nn.ReLU(True),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), # B,  32, 16, 16
            nn.ReLU(True),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), # B,  32, 32, 32
            nn.ReLU(True),
            nn.ConvTranspose2d(32, nc, 4, 2, 1), # B,  nc, 64, 64
        )
        self.weight_init()


class BetaVAE_MNIST(_BetaVAE):
    """The MLP VAE of the data-copying paper (Meehan et al., 2020) for 28x28 single-channel images.

    With l = 3 layers the widths are 784 -> 8z -> 4z -> 2z -> 2z (z=128: 784-1024-512-256-256) and mirrored in
    the decoder; the layer indices of the original (``encoder.1`` ... ``encoder.7``, ``decoder.0`` ...
    ``decoder.6``) are kept.
    """

    def __init__(self, z_dim=10, l=3, nc=1):
        super().__init__()
        if nc != 1:
            raise ValueError(f"BetaVAE_MNIST takes single-channel 28x28 images, got nc={nc}")
        self.z_dim = z_dim
        self.nc = 1
        self.input_shape = (1, 28, 28)
        self.encoder, self.decoder = self._build(z_dim, l)
        self.weight_init()

    @staticmethod
    def _build(d, l):
        import math
        alpha = 3 / l
        width = lambda k: d * int(math.ceil(2 ** (alpha * k)))  # noqa: E731
        encoder_layers, decoder_layers = [View((-1, 784))], []
        for k in range(l, 0, -1):
            in_dim = 784 if k == l else width(k + 1)
            encoder_layers += [nn.Linear(in_dim, width(k)), nn.ReLU()]
            decoder_layers = [nn.ReLU(), nn.Linear(width(k), in_dim)] + decoder_layers
        encoder_layers.append(nn.Linear(width(1), 2 * d))
        decoder_layers = [nn.Linear(d, width(1))] + decoder_layers + [View((-1, 1, 28, 28))]
        return nn.Sequential(*encoder_layers), nn.Sequential(*decoder_layers)


def build_model(model: str, z_dim: int, nc: int) -> _BetaVAE:
    """The one model builder: ``model`` is 'H', 'B' or 'MNIST' (the training flag ``--model``)."""
    if model == "H":
        return BetaVAE_H(z_dim=z_dim, nc=nc)
    if model == "B":
        return BetaVAE_B(z_dim=z_dim, nc=nc)
    if model == "MNIST":
        return BetaVAE_MNIST(z_dim=z_dim, nc=nc)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
