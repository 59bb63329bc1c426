"""The TracIn engine against plain per-sample reference computations, on tiny double-precision models and
real images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tracin_utils as tu
from Beta_VAE.checkpoint import CheckpointError, atomic_torch_save, make_state
from Beta_VAE.dataset import build_dataset
from Beta_VAE.model import build_model

R = 3  # reparameterisation draws: small, the code path is the same as 16


def make_checkpoints(folder, model="MNIST", z_dim=4, nc=1, dataset="mnist", iterations=(100, 200, 300),
                     beta=4.0, lr=1e-3, batch_size=32, config=True, seed=0):
    """Numbered checkpoints of one network whose weights drift between checkpoints, like training."""
    torch.manual_seed(seed)
    net = build_model(model, z_dim, nc)
    optim = torch.optim.SGD(net.parameters(), lr=lr)
    cfg = {"dataset": dataset, "model": model, "z_dim": z_dim, "nc": nc, "beta": beta, "objective": "H",
           "likelihood": "bernoulli" if dataset.startswith("mnist") else "gaussian", "optimizer": "sgd",
           "lr": lr, "batch_size": batch_size, "seed": seed}
    for it in iterations:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
        state = make_state(net, optim, it, cfg if config else {})
        if not config:
            del state["config"]
        atomic_torch_save(state, folder / str(it))
    return tu.find_checkpoints(folder)


@pytest.fixture(scope="module")
def mnist_images(demo_data):
    return build_dataset("mnist", train=True, train_size=24, data_dir=demo_data)


@pytest.fixture(scope="module")
def cifar_like_images(demo_data):
    # Real digits upsampled to 3x64x64 exercise the conv model with real image statistics.
    data = build_dataset("mnist", train=True, train_size=10, data_dir=demo_data)
    x = data.get_batch(range(10))[0]
    return F.interpolate(x, size=64, mode="bilinear").expand(-1, 3, -1, -1).contiguous()


def cfg_for(dataset="mnist", z_dim=4, beta=4.0, **kw):
    return tu.TracInConfig(dataset=dataset, z_dim=z_dim, beta=beta, reconstruct_num=R, **kw)


# ------------------------------------------------------------------------------------- reference loop
def reference_grad(net, names, x, eps, loss_fn):
    """Plain autograd on one sample, R separate forward passes as the original code: list of tensors."""
    params = dict(net.named_parameters())
    loss = 0.0
    for r in range(eps.shape[0]):
        logits, mu, logvar = net(x.unsqueeze(0), eps[r].unsqueeze(0))
        loss = loss + loss_fn(x.unsqueeze(0), logits.unsqueeze(1), mu, logvar)[0]
    loss = loss / eps.shape[0]
    return torch.autograd.grad(loss, [params[n] for n in names])


def reference_influence(train_x, test_x, test_ids, test_set, checkpoints, cfg):
    """TracIn as the original computes it: one sample at a time, a Python sum over checkpoints."""
    n = len(train_x)
    scores = np.zeros((len(test_x), n))
    for it, path, gap in tu.checkpoint_schedule(checkpoints):
        ck = tu.load_tracin_checkpoint(it, path, gap, n, cfg, dtype=torch.float64)
        names = tu.tracin_parameter_names(ck.net, cfg.use_last_layer)

        def g(x, set_id, i):
            eps = tu.reparam_noise(cfg.seed, it, set_id, [i], cfg.reconstruct_num, ck.net.z_dim,
                                   dtype=torch.float64)[0]
            return reference_grad(ck.net, names, x.double(), eps, ck.loss_fn)

        test_grads = [g(z, test_set, int(j)) for z, j in zip(test_x, test_ids)]
        for i in range(n):
            gi = g(train_x[i], tu.TRAIN_SET, i)
            for t, gt in enumerate(test_grads):
                scores[t, i] += ck.weight * sum(float((a * b).sum()) for a, b in zip(gi, gt))
    return scores


# ------------------------------------------------------------------------------------------------ noise
def test_noise_is_a_pure_function_of_its_keys():
    a = tu.reparam_noise(7, 100, tu.TRAIN_SET, torch.tensor([5, 9, 2]), 4, 6)
    b = tu.reparam_noise(7, 100, tu.TRAIN_SET, torch.tensor([2, 5]), 4, 6)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], tu.reparam_noise(7, 200, tu.TRAIN_SET, [5], 4, 6)[0])
    assert not torch.equal(a[0], tu.reparam_noise(7, 100, tu.TEST_SET, [5], 4, 6)[0])
    assert not torch.equal(a[0], tu.reparam_noise(8, 100, tu.TRAIN_SET, [5], 4, 6)[0])


def test_noise_is_standard_normal():
    eps = tu.reparam_noise(0, 50000, tu.TRAIN_SET, torch.arange(2000), 16, 32, dtype=torch.float64).flatten()
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.std().item() - 1) < 0.01
    # Tail mass beyond 2 sigma of N(0, 1) is 4.55%.
    assert abs((eps.abs() > 2).double().mean().item() - 0.0455) < 0.003
    assert len(torch.unique(eps)) > 0.999 * eps.numel()


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("use_last_layer", [0, 2])
@pytest.mark.parametrize("loss", ["train", "original"])
def test_vectorised_grads_equal_per_sample_loop_mlp(tmp_path, mnist_images, use_last_layer, loss):
    ckpts = make_checkpoints(tmp_path, iterations=(100,))
    cfg = cfg_for(use_last_layer=use_last_layer, loss=loss)
    ck = tu.load_tracin_checkpoint(100, ckpts[0][1], 100, 10, cfg, dtype=torch.float64)
    names = tu.tracin_parameter_names(ck.net, use_last_layer)
    assert len(names) == (16 if use_last_layer == 0 else 4)
    x = mnist_images.get_batch(range(6))[0].double()
    eps = tu.reparam_noise(0, 100, tu.TRAIN_SET, torch.arange(6), R, 4, dtype=torch.float64)
    fast = tu.per_sample_grads(ck.net, names, x, eps, ck.loss_fn, factored=False)
    for i in range(6):
        ref = reference_grad(ck.net, names, x[i], eps[i], ck.loss_fn)
        for n, r in zip(names, ref):
            torch.testing.assert_close(fast[n][i], r, rtol=1e-6, atol=1e-10)


def test_factored_linear_grads_equal_vmap_and_their_products(tmp_path, mnist_images):
    """The MLP's hook-based factored gradients against torch.func's vmap(grad), and the products taken on the
    factors against products of the dense gradients."""
    ckpts = make_checkpoints(tmp_path, iterations=(100,), z_dim=16)
    cfg = tu.TracInConfig(dataset="mnist", z_dim=16, beta=4.0, reconstruct_num=4)
    ck = tu.load_tracin_checkpoint(100, ckpts[0][1], 100, 10, cfg, dtype=torch.float64)
    names = tu.tracin_parameter_names(ck.net)
    x = mnist_images.get_batch(range(8))[0].double()
    eps = tu.reparam_noise(0, 100, tu.TRAIN_SET, torch.arange(8), 4, 16, dtype=torch.float64)
    factored = tu.per_sample_grads(ck.net, names, x, eps, ck.loss_fn)
    kinds = {n: type(g).__name__ for n, g in factored.items()}
    assert kinds["encoder.1.weight"] == "LowRankGrad" and kinds["decoder.6.weight"] == "LowRankGrad"
    assert kinds["decoder.0.weight"] == "Tensor"  # 16 -> 32: the dense gradient is the cheaper form
    dense = tu._vmap_per_sample_grads(ck.net, names, x, eps, ck.loss_fn)
    for n in names:
        g = factored[n].dense() if isinstance(factored[n], tu.LowRankGrad) else factored[n]
        torch.testing.assert_close(g, dense[n], rtol=1e-9, atol=1e-12)
    a, b = tu.concat_grads([{n: _take(g, slice(0, 3)) for n, g in factored.items()},
                            {n: _take(g, slice(3, 5)) for n, g in factored.items()}]), \
        {n: _take(g, slice(5, 8)) for n, g in factored.items()}
    dense_a = {n: g[:5] for n, g in dense.items()}
    dense_b = {n: g[5:] for n, g in dense.items()}
    torch.testing.assert_close(tu.grad_dot(a, b), tu.grad_dot(dense_a, dense_b), rtol=1e-10, atol=0)
    torch.testing.assert_close(tu.grad_sq_norm(factored), tu.grad_sq_norm(dense), rtol=1e-10, atol=0)


def _take(g, rows):
    return tu.LowRankGrad(g.g[rows], g.a[rows]) if isinstance(g, tu.LowRankGrad) else g[rows]


def test_vectorised_grads_equal_per_sample_loop_conv(tmp_path, cifar_like_images):
    ckpts = make_checkpoints(tmp_path, model="H", z_dim=4, nc=3, dataset="cifar", iterations=(100,), beta=2.0)
    cfg = cfg_for(dataset="cifar", beta=2.0)
    ck = tu.load_tracin_checkpoint(100, ckpts[0][1], 100, 10, cfg, dtype=torch.float64)
    names = tu.tracin_parameter_names(ck.net)
    assert any("decoder.11" in n for n in names)  # ConvTranspose2d and Conv2d both differentiated
    x = cifar_like_images[:3].double()
    eps = tu.reparam_noise(0, 100, tu.TRAIN_SET, torch.arange(3), R, 4, dtype=torch.float64)
    fast = tu.per_sample_grads(ck.net, names, x, eps, ck.loss_fn)
    for i in range(3):
        for n, r in zip(names, reference_grad(ck.net, names, x[i], eps[i], ck.loss_fn)):
            torch.testing.assert_close(fast[n][i], r, rtol=1e-6, atol=1e-10)


def test_original_loss_matches_transcription_of_original_code(tmp_path, mnist_images):
    """The original calc_loss: (mse_loss(sigmoid(recon), x, sum) / batch + beta * KL) / (3*64*64), averaged
    over reconstruct_num forward passes, applied to MNIST too."""
    ckpts = make_checkpoints(tmp_path, iterations=(100,))
    cfg = cfg_for(loss="original")
    ck = tu.load_tracin_checkpoint(100, ckpts[0][1], 100, 10, cfg, dtype=torch.float64)
    x = mnist_images.get_batch(range(4))[0].double()
    eps = tu.reparam_noise(0, 100, tu.TRAIN_SET, torch.arange(4), R, 4, dtype=torch.float64)
    ours = tu.per_sample_loss(ck.net, x, eps, ck.loss_fn)
    for i in range(4):
        z = x[i]
        loss = 0.0
        for r in range(R):
            z_recon, mu, logvar = ck.net(z.unsqueeze(0), eps[i, r].unsqueeze(0))
            recon = F.mse_loss(torch.sigmoid(z_recon), z.unsqueeze(0), reduction="sum").div(1)
            total_kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean(0, True)
            loss = loss + (recon + 4.0 * total_kld) / (3 * 64 * 64)
        torch.testing.assert_close(ours[i], (loss / R)[0].detach(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ influence
@pytest.fixture(scope="module")
def three_ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpts"), iterations=(100, 250, 600))


def test_engine_equals_plain_per_sample_loop(three_ckpts, mnist_images):
    cfg = cfg_for(chunk_size=5)
    train_x = mnist_images.get_batch(range(12))[0]
    test_x = mnist_images.get_batch(range(12, 15))[0]
    fast = tu.pairwise_influence(test_x, train_x, three_ckpts, cfg, dtype=torch.float64, progress=False)
    ref = reference_influence(train_x, test_x, range(3), tu.TEST_SET, three_ckpts, cfg)
    np.testing.assert_allclose(fast.influences, ref, rtol=1e-6)
    self_fast = tu.self_influence(train_x, three_ckpts, cfg, dtype=torch.float64, progress=False)
    self_ref = reference_influence(train_x, train_x, range(12), tu.TRAIN_SET, three_ckpts, cfg).diagonal()
    np.testing.assert_allclose(self_fast.influences, self_ref, rtol=1e-6)


def test_self_influence_is_diagonal_of_pairwise(three_ckpts, mnist_images):
    cfg = cfg_for(chunk_size=7)
    train_x = mnist_images.get_batch(range(20))[0]
    selfinf = tu.self_influence(mnist_images, three_ckpts, cfg, dtype=torch.float64, progress=False)
    pair = tu.pairwise_influence(train_x, mnist_images, three_ckpts, cfg, test_train_indices=range(20),
                                 dtype=torch.float64, progress=False)
    np.testing.assert_allclose(np.diagonal(pair.influences[:, :20]), selfinf.influences[:20], rtol=1e-10)
    assert (selfinf.influences > 0).all()
    # Each sample is its own strongest proponent here: self influence dominates.
    assert (pair.helpful[:, 0] == np.arange(20)).mean() >= 0.9


def test_invariant_to_chunk_size_and_order(three_ckpts, mnist_images):
    base = None
    for chunk in (1, 7, 64):
        res = tu.self_influence(mnist_images, three_ckpts, cfg_for(chunk_size=chunk), dtype=torch.float64,
                                progress=False)
        if base is None:
            base = res.influences
        np.testing.assert_allclose(res.influences, base, rtol=1e-12)
    # Shuffled test points give the same rows, permuted (test noise follows the test id).
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    x = mnist_images.get_batch(range(24))[0]
    a = tu.pairwise_influence(x, mnist_images, three_ckpts, cfg_for(chunk_size=5), test_train_indices=range(24),
                              dtype=torch.float64, progress=False)
    b = tu.pairwise_influence(x[perm], mnist_images, three_ckpts, cfg_for(chunk_size=9),
                              test_train_indices=perm.tolist(), dtype=torch.float64, progress=False)
    np.testing.assert_allclose(b.influences, a.influences[perm.numpy()], rtol=1e-12)


def test_checkpoint_weights_follow_the_gaps(tmp_path, mnist_images):
    ckpts = make_checkpoints(tmp_path, iterations=(1000000, 50000, 100000), lr=3e-4, batch_size=64)
    assert [it for it, _ in ckpts] == [50000, 100000, 1000000]  # numeric, not string, order
    cfg = cfg_for()
    res = tu.self_influence(mnist_images, ckpts, cfg, dtype=torch.float64, progress=False)
    n = len(mnist_images)
    expected = [3e-4 * 64 * gap / n for gap in (50000, 50000, 900000)]
    assert [c["weight"] for c in res.checkpoints] == pytest.approx(expected, rel=1e-12)
    # And the score is the weighted sum of per-checkpoint squared gradient norms.
    total = np.zeros(n)
    for (it, path, gap), w in zip(tu.checkpoint_schedule(ckpts), expected):
        ck = tu.load_tracin_checkpoint(it, path, gap, n, cfg, dtype=torch.float64)
        eps = tu.reparam_noise(0, it, tu.TRAIN_SET, torch.arange(n), R, 4, dtype=torch.float64)
        x = mnist_images.get_batch(range(n))[0].double()
        g = tu.per_sample_grads(ck.net, tu.tracin_parameter_names(ck.net), x, eps, ck.loss_fn, factored=False)
        total += w * np.array([sum(float(t[i].pow(2).sum()) for t in g.values()) for i in range(n)])
    np.testing.assert_allclose(res.influences, total, rtol=1e-10)
    last = tu.find_checkpoints(tmp_path, last_epoch=True)
    assert [it for it, _ in last] == [1000000]
    assert [it for it, _ in tu.find_checkpoints(tmp_path, suffix="0000")] == [50000, 100000, 1000000]


def test_orderings_are_stable_argsorts():
    helpful, harmful = tu.order_by_influence(np.array([0.5, 2.0, 0.5, -1.0]))
    assert helpful.tolist() == [1, 0, 2, 3] and harmful.tolist() == [3, 0, 2, 1]


def test_checkpoint_without_config_uses_original_constants(tmp_path, mnist_images, caplog):
    ckpts = make_checkpoints(tmp_path, iterations=(100,), config=False)
    res = tu.self_influence(mnist_images, ckpts, cfg_for(), dtype=torch.float64, progress=False)
    assert res.checkpoints[0]["lr"] == 1e-3  # from the optimizer state
    assert res.checkpoints[0]["batch_size"] == 64  # the original's constant
    assert "records no batch size" in caplog.text


def test_resume_from_cache_reuses_finished_checkpoints(three_ckpts, mnist_images, tmp_path, monkeypatch):
    cfg = cfg_for()
    first = tu.self_influence(mnist_images, three_ckpts, cfg, dtype=torch.float64, cache_dir=tmp_path,
                              progress=False)
    assert len(list(tmp_path.glob("ckpt_*.pt"))) == 3
    monkeypatch.setattr(tu, "per_sample_grads", lambda *a, **k: pytest.fail("recomputed a cached checkpoint"))
    again = tu.self_influence(mnist_images, three_ckpts, cfg, dtype=torch.float64, cache_dir=tmp_path,
                              progress=False)
    np.testing.assert_array_equal(again.influences, first.influences)
    assert again.checkpoints == first.checkpoints


def test_cache_is_not_reused_for_a_replaced_checkpoint(tmp_path, mnist_images):
    folder, cache = tmp_path / "ckpts", tmp_path / "cache"
    folder.mkdir()
    ckpts = make_checkpoints(folder, iterations=(100, 200))
    cfg = cfg_for()
    first = tu.self_influence(mnist_images, ckpts, cfg, dtype=torch.float64, cache_dir=cache, progress=False)
    make_checkpoints(folder, iterations=(100, 200), seed=1)  # retrained: same names, other weights
    again = tu.self_influence(mnist_images, ckpts, cfg, dtype=torch.float64, cache_dir=cache, progress=False)
    fresh = tu.self_influence(mnist_images, ckpts, cfg, dtype=torch.float64, progress=False)
    np.testing.assert_array_equal(again.influences, fresh.influences)
    assert not np.allclose(again.influences, first.influences)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_checkpoints_are_clear_errors(tmp_path, mnist_images):
    with pytest.raises(CheckpointError, match="no numbered checkpoints"):
        tu.find_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        tu.find_checkpoints(tmp_path / "nope")
    (tmp_path / "100").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"100 is empty"):
        tu.self_influence(mnist_images, tu.find_checkpoints(tmp_path), cfg_for(), progress=False)
    (tmp_path / "100").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"100 is corrupt"):
        tu.self_influence(mnist_images, tu.find_checkpoints(tmp_path), cfg_for(), progress=False)
    ckpts = make_checkpoints(tmp_path, iterations=(100,))
    state = torch.load(ckpts[0][1], weights_only=True)
    state["model_states"]["net"]["decoder.6.bias"][0] = float("nan")
    torch.save(state, ckpts[0][1])
    with pytest.raises(CheckpointError, match=r"100 has non-finite weights in decoder.6.bias"):
        tu.self_influence(mnist_images, ckpts, cfg_for(), progress=False)


def test_contradicting_flags_are_clear_errors(three_ckpts, mnist_images):
    with pytest.raises(CheckpointError, match="z_dim 4, but --latent_dim is 8"):
        tu.self_influence(mnist_images, three_ckpts, cfg_for(z_dim=8), progress=False)
    with pytest.raises(CheckpointError, match="beta 4.0, but --beta is 2"):
        tu.self_influence(mnist_images, three_ckpts, cfg_for(beta=2), progress=False)
    with pytest.raises(CheckpointError, match="trained on --dataset mnist, not mnist_emnist_extra"):
        tu.self_influence(mnist_images, three_ckpts, cfg_for(dataset="mnist_emnist_extra"), progress=False)


def test_auto_chunk_size_counts_gradients_and_activations_of_every_draw():
    net = build_model("MNIST", 128, 1).eval()
    # Layer outputs of one sample: encoder 784 (view) + 1024 + 1024 + 512 + 512 + 256 + 256 + 256 once, decoder
    # 256 + 256 + 512 + 512 + 1024 + 1024 + 784 + 784 (view) per draw.
    assert tu._activation_numel(net, 16) == 4624 + 16 * 5152
    names = tu.tracin_parameter_names(net)
    small = tu.TracInConfig(dataset="mnist", z_dim=128, beta=4.0, memory_budget_mb=64)
    chunk = tu._auto_chunk_size(net, names, small, torch.float32)
    assert 1 <= chunk < tu._auto_chunk_size(net, names, tu.TracInConfig(dataset="mnist", z_dim=128, beta=4.0,
                                                                        memory_budget_mb=128), torch.float32)
    # The conv model's 16 decoder passes of 64x64 images dominate: a much smaller chunk in the same budget.
    conv = build_model("H", 64, 3).eval()
    conv_chunk = tu._auto_chunk_size(conv, tu.tracin_parameter_names(conv),
                                     tu.TracInConfig(dataset="cifar", z_dim=64, beta=2.0, memory_budget_mb=64),
                                     torch.float32)
    assert 1 <= conv_chunk < chunk / 4
    assert tu._auto_chunk_size(net, names, cfg_for(chunk_size=5), torch.float32) == 5


def test_cache_follows_the_checkpoint_schedule_and_the_data(three_ckpts, mnist_images, tmp_path):
    """Cached products are reused under another schedule (the weights follow the new gaps) and never for other
    samples of the same count."""
    cfg = cfg_for()
    x = mnist_images.get_batch(range(24))[0]
    tu.self_influence(x, three_ckpts, cfg, dtype=torch.float64, cache_dir=tmp_path, progress=False)
    later = three_ckpts[1:]  # as with another --ckpt_suffix: checkpoint 250's gap is now 250, not 150
    cached = tu.self_influence(x, later, cfg, dtype=torch.float64, cache_dir=tmp_path, progress=False)
    fresh = tu.self_influence(x, later, cfg, dtype=torch.float64, progress=False)
    np.testing.assert_array_equal(cached.influences, fresh.influences)
    assert [c["weight"] for c in cached.checkpoints] == [c["weight"] for c in fresh.checkpoints]
    other = x.flip(0)  # the same number of samples, other images at each index
    cached = tu.self_influence(other, later, cfg, dtype=torch.float64, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(cached.influences, tu.self_influence(other, later, cfg, dtype=torch.float64,
                                                                       progress=False).influences)
    assert not np.allclose(cached.influences, fresh.influences)


def test_files_are_written_atomically_with_the_usual_permissions(tmp_path):
    import os
    from pathlib import Path
    from Beta_VAE.checkpoint import atomic_write
    path = tmp_path / "500"
    mask = os.umask(0o022)
    try:
        atomic_torch_save({"iter": 1}, path)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as any new file (mkstemp's are 0600)
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            Path(tmp).write_text("half a checkpoint")
            raise RuntimeError("interrupted")
    assert torch.load(path, weights_only=True) == {"iter": 1} and list(tmp_path.iterdir()) == [path]
