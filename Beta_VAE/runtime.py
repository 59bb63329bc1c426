"""Process set-up shared by every command line (training and both VAE-TracIn scripts): seeds, the one device,
logging that does not break progress bars, one-line warnings, and Ctrl-C handling."""
import logging
import random
import signal
import sys
import threading
import warnings

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def set_seeds(seed):
    """Seed Python, NumPy and torch (all devices); first thing every script does."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def select_device(gpu, use_cuda=True) -> torch.device:
    """The one device of a run: ``cuda:<gpu>`` when asked for and present, else the CPU with a one-line notice.

    A ``--gpu`` index that does not exist is an error, not a silent fallback.
    """
    if use_cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if not 0 <= gpu < n:
            raise SystemExit(f"error: --gpu {gpu}: only {n} CUDA device(s) are visible (0-{n - 1})")
        return torch.device(f"cuda:{gpu}")
    if use_cuda:
        log.warning("CUDA is not available: running on the CPU (--gpu %d ignored)", gpu)
    return torch.device("cpu")


class _TqdmHandler(logging.Handler):
    """Log lines written through tqdm, so they do not break a progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


class _Formatter(logging.Formatter):
    """Plain INFO lines; 'WARNING: ...' / 'ERROR: ...' above them."""

    def format(self, record):
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname}: {message}"


def setup_logging():
    """INFO and above to stderr through tqdm (added once; other handlers, e.g. pytest's, are left alone)."""
    root = logging.getLogger()
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


def one_line_warnings():
    """Python warnings of a command-line run as one line each (no source line echoed under the progress bar)."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"


class InterruptAfterStep:
    """Context manager: a first Ctrl-C only sets ``requested`` (the loop finishes its step, saves, then stops);
    a second one interrupts at once. Outside the main thread signals cannot be caught, and Ctrl-C acts at once."""

    def __init__(self, message):
        self.message = message
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(self.message, file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
