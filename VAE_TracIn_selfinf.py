"""VAE-TracIn self influences of every training sample, and unsupervised data cleaning on *_extra datasets.

After training the matching model (Beta_VAE/main.py, see README):

    python VAE_TracIn_selfinf.py --beta 4 --latent_dim 128 --dataset mnist --last_epoch
    python VAE_TracIn_selfinf.py --beta 2 --latent_dim 128 --dataset cifar --last_epoch
    python VAE_TracIn_selfinf.py --beta 2 --latent_dim 64 --dataset cifar_zero --last_epoch
    python VAE_TracIn_selfinf.py --beta 4 --latent_dim 128 --dataset mnist_emnist_extra --last_epoch
    python VAE_TracIn_selfinf.py --beta 2 --latent_dim 128 --dataset cifar_celeba_extra --last_epoch

Writes to <output_root>/self_influence/<network_config>/: result{_lastK}{_lastepoch}.pkl (influences / helpful /
harmful as torch tensors, readable with weights_only=True, plus the settings; the settings also as .json),
high_selfinf_train_samples.jpg / low_selfinf_train_samples.jpg, selfinf_byELBO.jpg, selfinf_kde_byELBO.pdf and,
for *_extra datasets, AUC.png (the extras are the last samples; they should have the highest self influence).
"""
import logging
import time

import reports
import tracin_cli as cli
import tracin_utils as tu
from Beta_VAE import runtime

log = logging.getLogger(__name__)

CHECK_FRACTIONS = (0.01, 0.05, 0.10)


def parse_args(argv=None):
    return cli.base_parser(__doc__, n_display=64).parse_args(argv)


@cli.guarded
def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    run = cli.prepare(args, kind="self_influence")
    data = run.train_data

    scores = cli.load_or_compute(run, run.identity(script="selfinf"), lambda cache_dir: tu.self_influence(
        data, run.checkpoints, run.cfg, device=run.device, cache_dir=cache_dir, cache_tag=run.data_tag))
    out = {"out_dir": run.out_dir, "result_file": run.result_path, "recomputed": scores.recomputed,
           "n_train": len(data)}

    # Unsupervised data cleaning: the extras are indices n_base .. N-1.
    if len(data.extra_indices):
        auc, rates = reports.get_auc_score(scores.helpful, data.extra_indices)
        print("extra detection AUC (self-inf): {:1.4f}".format(auc))
        found = {f: reports.found_after(rates, f) for f in CHECK_FRACTIONS}
        for f, v in found.items():
            print(f"found {v:.1%} of the {len(data.extra_indices)} extra samples after checking "
                  f"{f:.0%} of the training data")
        reports.plot_detection_curve(rates, run.out_dir / "AUC.png")
        out.update(auc=auc, found=found)

    # Self influence vs -loss at the --ckpt_iter checkpoint (same noise as the training gradients there).
    losses = tu.sample_losses(data, run.feature.path, run.cfg, iteration=run.feature.iteration, device=run.device)
    out["r2"] = reports.plot_selfinf_by_elbo(-losses, scores.influences, run.out_dir / "selfinf_byELBO.jpg",
                                             run.out_dir / "selfinf_kde_byELBO.pdf")
    print("self influence vs -ELBO at checkpoint {}: linear fit R^2 = {:.3f}".format(run.feature.iteration,
                                                                                     out["r2"]))

    n = min(args.n_display, len(data))
    reports.save_grid(data.get_batch(scores.helpful[:n])[0], run.out_dir / "high_selfinf_train_samples.jpg")
    reports.save_grid(data.get_batch(scores.harmful[:n])[0], run.out_dir / "low_selfinf_train_samples.jpg")
    print(f"saved the {n} highest and lowest self influence samples to {run.out_dir} "
          f"({time.time() - start:.1f}s)")
    return out


if __name__ == "__main__":
    runtime.one_line_warnings()
    main()
