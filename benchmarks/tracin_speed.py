"""VAE-TracIn speed and memory: the engine against a per-sample loop in the original code's style.

Builds a checkpoint set of the MNIST model (z 128) on real MNIST digits and, on the same checkpoints, samples
and reconstruct_num, times
  (a) the original style: one sample at a time, `reconstruct_num` forward passes of batch 1, gradients with
      create_graph=True, Python sums of per-tensor dot products;
  (b) the engine (tracin_utils.self_influence / pairwise_influence),
for self influence and for pairwise influence with 128 test points. Prints samples/second for both and their
ratio, the engine's peak memory for two training-set sizes (it must not grow with n_train), and the engine's
achieved GFLOP/s next to torch.mm's, measured in the same run.

    python benchmarks/tracin_speed.py                  # defaults sized for a 2-core CPU, a few minutes
    python benchmarks/tracin_speed.py --device cuda --n_train 4096 --n_loop 256
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import paths  # noqa: E402
import tracin_utils as tu  # noqa: E402
from Beta_VAE.checkpoint import atomic_torch_save, make_state  # noqa: E402
from Beta_VAE.dataset import build_dataset  # noqa: E402
from Beta_VAE.losses import beta_vae_loss  # noqa: E402
from Beta_VAE.model import build_model  # noqa: E402

Z_DIM, BETA, LR, BATCH = 128, 4.0, 1e-4, 64


def make_checkpoints(folder, n_ckpts, seed=0):
    """A checkpoint set of one MNIST-model network that drifts like SGD training would."""
    torch.manual_seed(seed)
    net = build_model("MNIST", Z_DIM, 1)
    optim = torch.optim.SGD(net.parameters(), lr=LR)
    config = {"dataset": "mnist", "model": "MNIST", "z_dim": Z_DIM, "nc": 1, "beta": BETA, "objective": "H",
              "likelihood": "bernoulli", "optimizer": "sgd", "lr": LR, "batch_size": BATCH}
    for k in range(1, n_ckpts + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 0.01 * torch.randn_like(p))
        atomic_torch_save(make_state(net, optim, 500 * k, config), Path(folder) / str(500 * k))
    return tu.find_checkpoints(folder)


def loop_style(train_x, test_x, checkpoints, cfg, device, n_test=None, n_total=None):
    """The original code's computation, kept in its shape: per sample, R forward passes, create_graph=True.

    Returns (scores (len(test_x) or 1, n), seconds spent on test gradients, seconds on training samples).
    With n_test > len(test_x), every training gradient is dotted with n_test test gradients (the given ones
    cycled), so the per-training-sample cost is that of n_test test points; the test-gradient time is
    reported for len(test_x) points and scales linearly with their number. n_total: the training-set size N of
    the weights lr * batch * gap / N, when train_x is a part of it.
    """
    n = len(train_x)
    scores = torch.zeros(len(test_x) if test_x is not None else 1, n, dtype=torch.float64)
    t_test = t_train = 0.0
    for it, path, gap in tu.checkpoint_schedule(checkpoints):
        ck = tu.load_tracin_checkpoint(it, path, gap, n_total or n, cfg, device=device)
        net, params = ck.net, list(ck.net.parameters())

        def grad_z(x, set_id, i):
            # The engine's noise, so that both compute the same scores.
            eps = tu.reparam_noise(cfg.seed, it, set_id, [i], cfg.reconstruct_num, Z_DIM, device=device)[0]
            loss = 0.0
            for r in range(cfg.reconstruct_num):
                logits, mu, logvar = net(x.unsqueeze(0).to(device), eps[r:r + 1])
                loss += beta_vae_loss(x.unsqueeze(0).to(device), logits, mu, logvar, likelihood="bernoulli",
                                      beta=cfg.beta)[0]
            loss /= cfg.reconstruct_num
            return list(grad(loss, params, create_graph=True))

        start = time.perf_counter()
        test_grads = [grad_z(z, tu.TEST_SET, j) for j, z in enumerate(test_x)] if test_x is not None else None
        t_test += time.perf_counter() - start
        start = time.perf_counter()
        for i in range(n):
            g = grad_z(train_x[i], tu.TRAIN_SET, i)
            if test_grads is None:
                scores[0, i] += float(sum(torch.sum(k * k).detach() for k in g).cpu()) * ck.weight
                continue
            for j in range(n_test or len(test_grads)):
                gt = test_grads[j % len(test_grads)]
                dot = float(sum(torch.sum(k * t).detach() for k, t in zip(g, gt)).cpu()) * ck.weight
                if j < len(test_grads):
                    scores[j, i] += dot
        t_train += time.perf_counter() - start
    return scores, t_test, t_train


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def engine_flops(train_x, checkpoints, cfg, device):
    """FLOPs of the engine's gradient computation for one chunk, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    it, path, gap = tu.checkpoint_schedule(checkpoints)[0]
    ck = tu.load_tracin_checkpoint(it, path, gap, len(train_x), cfg, device=device)
    names = tu.tracin_parameter_names(ck.net)
    x = train_x[:cfg.chunk_size].to(device)
    eps = tu.reparam_noise(cfg.seed, it, tu.TRAIN_SET, torch.arange(len(x)), cfg.reconstruct_num, Z_DIM, device=device)
    with FlopCounterMode(display=False) as counter:
        grads = tu.per_sample_grads(ck.net, names, x, eps, ck.loss_fn)
        tu.grad_sq_norm(grads)
    return counter.get_total_flops() / len(x)


def mm_gflops(device, size=2048, reps=10):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _, t = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * size ** 3 * reps / t / 1e9


def peak_memory_child(args, n_train):
    """Run the engine's self influence in a fresh process and return its peak RSS (MiB)."""
    cmd = [sys.executable, __file__, "--_memory_probe", str(n_train), "--ckpt_dir", args.ckpt_dir,
           "--device", args.device, "--chunk_size", str(args.chunk_size), "--data", str(args.data)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mib():
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter keeps the forking parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(args):
    data = build_dataset("mnist", train=True, train_size=args._memory_probe, data_dir=args.data)
    cfg = tu.TracInConfig(dataset="mnist", z_dim=Z_DIM, beta=BETA, reconstruct_num=16, chunk_size=args.chunk_size)
    rss_before = peak_rss_mib()
    tu.self_influence(data, tu.find_checkpoints(args.ckpt_dir), cfg, device=args.device, progress=False)
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.device(args.device).type == "cuda" else None
    print(json.dumps({"n_train": len(data), "peak_rss_mib": peak_rss_mib(),
                      "rss_after_data_mib": rss_before, "peak_gpu_mib": gpu}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=os.environ.get(paths.DATA_ENV_VAR) or str(paths.DEMO_DATA_ROOT),
                        help="data root with MNIST/raw (default $VAE_TRACIN_DATA, else the shipped demo data)")
    parser.add_argument("--n_ckpts", type=int, default=2, help="checkpoints in the set")
    parser.add_argument("--n_loop", type=int, default=32, help="training samples timed with the per-sample loop")
    parser.add_argument("--n_train", type=int, default=512, help="training samples timed with the engine")
    parser.add_argument("--n_test", type=int, default=128, help="test points for pairwise influence")
    parser.add_argument("--chunk_size", type=int, default=32)
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--_memory_probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_probe:
        return memory_probe(args)

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    args.ckpt_dir = args.ckpt_dir or tmp.name
    checkpoints = make_checkpoints(args.ckpt_dir, args.n_ckpts)
    data = build_dataset("mnist", train=True, train_size=max(args.n_train, args.n_loop), data_dir=args.data)
    test = build_dataset("mnist", train=False, train_size=args.n_test, data_dir=args.data)
    train_x = data.get_batch(range(args.n_train))[0]
    loop_x = train_x[:args.n_loop]
    test_x = test.get_batch(range(args.n_test))[0]
    cfg = tu.TracInConfig(dataset="mnist", z_dim=Z_DIM, beta=BETA, reconstruct_num=16, chunk_size=args.chunk_size)
    n_ck = len(checkpoints)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MNIST model z {Z_DIM}, reconstruct_num 16, {n_ck} checkpoints, chunk {args.chunk_size}")

    # Warm-up (allocator, kernels, thread pool) for both, so neither timing includes one-time start-up costs.
    loop_style(loop_x[:1], None, checkpoints, cfg, args.device, n_total=args.n_train)
    tu.self_influence(train_x[:args.chunk_size], checkpoints, cfg, device=args.device, progress=False)

    # Self influence.
    (ref, _, _), t_loop = timed(lambda: loop_style(loop_x, None, checkpoints, cfg, args.device,
                                                   n_total=args.n_train), args.device)
    res, t_engine = timed(lambda: tu.self_influence(train_x, checkpoints, cfg, device=args.device, progress=False),
                          args.device)
    agree = torch.allclose(torch.as_tensor(res.influences[:args.n_loop]), ref[0], rtol=1e-3)
    loop_sps, engine_sps = args.n_loop * n_ck / t_loop, args.n_train * n_ck / t_engine
    print(f"selfinf loop:   {loop_sps:10.1f} samples/s  ({args.n_loop} samples x {n_ck} ckpts in {t_loop:.1f} s)")
    print(f"selfinf engine: {engine_sps:10.1f} samples/s  ({args.n_train} samples x {n_ck} ckpts in {t_engine:.1f} s)"
          f"  [scores agree with the loop: {agree}]")
    print(f"speedup_selfinf: {engine_sps / loop_sps:.1f}")

    # Pairwise influence with n_test test points. The loop's test gradients are timed on n_loop_test points
    # and scaled to n_test (each costs the same); its per-training-sample cost includes all n_test products.
    n_loop_pair, n_loop_test = max(2, args.n_loop // 4), min(8, args.n_test)
    ref, t_test, t_train = loop_style(loop_x[:n_loop_pair], test_x[:n_loop_test], checkpoints, cfg, args.device,
                                      n_test=args.n_test, n_total=args.n_train)
    t_test_full = t_test * args.n_test / n_loop_test
    loop_sps = args.n_train * n_ck / (t_test_full + t_train * args.n_train / n_loop_pair)
    res, t_engine = timed(lambda: tu.pairwise_influence(test_x, train_x, checkpoints, cfg, device=args.device,
                                                        progress=False), args.device)
    agree = torch.allclose(torch.as_tensor(res.influences[:n_loop_test, :n_loop_pair]), ref, rtol=1e-3, atol=1e-12)
    engine_sps = args.n_train * n_ck / t_engine
    print(f"testinf loop:   {loop_sps:10.2f} samples/s  (for {args.n_train} train x {args.n_test} test x {n_ck} ckpts: "
          f"{t_train / n_loop_pair / n_ck:.2f} s per train sample, {t_test / n_loop_test / n_ck:.2f} s per test "
          f"gradient, measured on {n_loop_pair} train and {n_loop_test} test points)")
    print(f"testinf engine: {engine_sps:10.2f} samples/s  ({args.n_train} train x {args.n_test} test x {n_ck} ckpts "
          f"in {t_engine:.1f} s)  [scores agree with the loop: {agree}]")
    print(f"speedup_testinf: {engine_sps / loop_sps:.1f}")

    # Achieved FLOP rate of the gradient computation vs the machine's matmul rate.
    flops_per_sample = engine_flops(train_x, checkpoints, cfg, args.device)
    _, t_grad = timed(lambda: tu.self_influence(train_x, checkpoints, cfg, device=args.device, progress=False),
                      args.device)
    print(f"engine GFLOP/s (self influence): {flops_per_sample * args.n_train * n_ck / t_grad / 1e9:.1f}   "
          f"torch.mm GFLOP/s: {mm_gflops(args.device):.1f}   ({flops_per_sample / 1e6:.0f} MFLOP per sample "
          f"per checkpoint)")

    # Peak memory must not grow with n_train.
    for n in (args.n_train // 4, args.n_train):
        m = peak_memory_child(args, n)
        gpu = f", peak GPU {m['peak_gpu_mib']:.0f} MiB" if m["peak_gpu_mib"] is not None else ""
        print(f"peak memory, self influence on {m['n_train']:5d} samples: {m['peak_rss_mib']:.0f} MiB RSS "
              f"(after loading data {m['rss_after_data_mib']:.0f} MiB){gpu}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
