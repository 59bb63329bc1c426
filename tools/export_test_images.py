"""Export test images of a dataset as ``test_<index>.jpg`` files.

The files are what ``VAE_TracIn_testinf.py --task test --load_from_jpg --load_from_jpg_dir DIR`` reads; the
index in each name is the image's index in the dataset's test split, ``build_dataset(name, train=False)``
(for ``cifar_<class>`` that is the index among the test images of that class; CelebA has no test split, so its
images are the face files in name order). One-channel images are written as grayscale JPEGs, three-channel ones
as RGB, at quality 95. Each file is written to a temporary name and renamed, so a folder never holds half a file.

Examples::

    python tools/export_test_images.py --dataset mnist --indices 0 1 2
    python tools/export_test_images.py --dataset mnist --indices 0-127 --out_dir /tmp/test_mnist
    python tools/export_test_images.py --dataset cifar --first 128 --dset_dir ../shared/data
    python tools/export_test_images.py --dataset mnist --indices_file tools/test_mnist_indices.txt \\
        --out_dir output/images/test_mnist
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paths  # noqa: E402
from Beta_VAE.dataset import DATASETS, DataError, build_dataset  # noqa: E402
from reports import save_image_file  # noqa: E402


def parse_indices(tokens, flag):
    """``["3", "0-7", "12"]`` -> ``[3, 0, 1, ..., 7, 12]`` (ranges inclusive, duplicates dropped, order kept)."""
    out = []
    for token in tokens:
        try:
            if "-" in token[1:]:  # a range low-high (a leading "-" alone is a negative index)
                low, high = (int(t) for t in token.split("-"))
                if high < low:
                    raise ValueError
                out.extend(range(low, high + 1))
            else:
                out.append(int(token))
        except ValueError:
            raise SystemExit(f"{flag}: {token!r} is neither an index nor a range low-high (low <= high) "
                             f"like 0-127") from None
    return list(dict.fromkeys(out))


def read_indices_file(path):
    """Whitespace-separated indices or ranges; ``#`` starts a comment."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"--indices_file: cannot read {path}: {e.strerror}") from None
    return [tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("--dataset", default="mnist", choices=DATASETS, help="dataset whose test split is read")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--indices", nargs="+", metavar="I", help="test indices or inclusive ranges: 0 1 2, 0-127")
    which.add_argument("--first", type=int, metavar="N", help="the first N test images (indices 0..N-1)")
    which.add_argument("--indices_file", metavar="PATH",
                       help="file of indices or ranges, whitespace-separated, '#' comments")
    parser.add_argument("--out_dir", default=None,
                        help="folder to write into (default: output/images/test_<dataset>)")
    parser.add_argument("--dset_dir", default=None,
                        help=f"data root (default: ${paths.DATA_ENV_VAR}, else <repo>/data)")
    parser.add_argument("--image_size", type=int, default=64, help="side of CIFAR / CelebA images (as training)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    args = parser.parse_args(argv)

    if args.first is not None:
        flag, indices = "--first", list(range(args.first))
        if args.first <= 0:
            raise SystemExit(f"--first: must be positive, got {args.first}")
    elif args.indices_file is not None:
        flag = "--indices_file"
        indices = parse_indices(read_indices_file(args.indices_file), flag)
    else:
        flag, indices = "--indices", parse_indices(args.indices, "--indices")
    if not indices:
        raise SystemExit(f"{flag}: no indices given")

    try:
        data = build_dataset(args.dataset, train=False, image_size=args.image_size, data_dir=args.dset_dir)
    except DataError as e:
        raise SystemExit(str(e)) from None
    n = len(data)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise SystemExit(f"{flag}: index {bad[0]} is out of range: the {args.dataset} test split has {n} images, "
                         f"valid indices are 0-{n - 1}")

    out_dir = Path(args.out_dir) if args.out_dir else paths.OUTPUT_ROOT / "images" / f"test_{args.dataset}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in indices:
        image, _ = data[i]
        save_image_file(image, out_dir / f"test_{i}.jpg", quality=args.quality)
    print(f"wrote {len(indices)} {args.dataset} test images (test_<index>.jpg) to {out_dir}")
    return out_dir


if __name__ == "__main__":
    main()
