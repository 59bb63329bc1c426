"""The engine on a CUDA device gives the CPU's scores (marked gpu: deselected by default, run with pytest -m gpu)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tracin_utils as tu
from Beta_VAE.dataset import build_dataset
from test_tracin import cfg_for, make_checkpoints

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def full_precision_cuda():
    # TF32 would make GPU results differ from CPU ones at the 1e-3 level.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("model", ["MNIST", "H"])
def test_cuda_scores_equal_cpu_scores(tmp_path, demo_data, model):
    digits = build_dataset("mnist", train=True, train_size=12, data_dir=demo_data).get_batch(range(12))[0]
    if model == "H":  # real digits as 3x64x64 images for the conv model
        images, dataset, nc = F.interpolate(digits, size=64, mode="bilinear").expand(-1, 3, -1, -1).contiguous(), \
            "cifar", 3
    else:
        images, dataset, nc = digits, "mnist", 1
    ckpts = make_checkpoints(tmp_path, model=model, z_dim=4, nc=nc, dataset=dataset)
    cfg = cfg_for(dataset=dataset, z_dim=4)
    tests = images[:3]
    for device in ("cpu", "cuda"):
        s = tu.self_influence(images, ckpts, cfg, device=device, dtype=torch.float64, progress=False)
        p = tu.pairwise_influence(tests, images, ckpts, cfg, device=device, dtype=torch.float64, progress=False)
        if device == "cpu":
            cpu_self, cpu_pair = s.influences, p.influences
    np.testing.assert_allclose(np.asarray(s.influences), np.asarray(cpu_self), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(p.influences), np.asarray(cpu_pair), rtol=1e-9, atol=1e-12)
