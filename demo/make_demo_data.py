"""Make the small real dataset shipped in ``demo/data`` from a full data folder.

Writes, laid out like the full data folder (so the same loaders read it with ``VAE_TRACIN_DATA=demo/data``)::

    demo/data/MNIST/raw/train-images-idx3-ubyte.gz   first 5000 MNIST training images   (+ labels)
    demo/data/MNIST/raw/t10k-images-idx3-ubyte.gz    first 500 MNIST test images        (+ labels)
    demo/data/EMNIST/raw/emnist-letters-train-*.gz   first 200 training letters          (+ labels)
    demo/data/EMNIST/raw/emnist-letters-test-*.gz    first 50 test letters               (+ labels)

Every record is a bit-exact copy of the source record; only the IDX header's first dimension (the count) changes.
Letters stay as stored in the source (transposed, like EMNIST's raw files). The gzip files carry no name and
mtime 0, so rerunning on the same source writes the same bytes (with the same zlib).

Usage::

    python demo/make_demo_data.py --source ../shared/data          # default: $VAE_TRACIN_DATA
    python demo/make_demo_data.py --source ../shared/data --out /tmp/demo_data
"""
import argparse
import gzip
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paths  # noqa: E402

# (folder, file stem without .gz, number of leading records kept)
DEMO_FILES = (
    ("MNIST/raw", "train-images-idx3-ubyte", 5000),
    ("MNIST/raw", "train-labels-idx1-ubyte", 5000),
    ("MNIST/raw", "t10k-images-idx3-ubyte", 500),
    ("MNIST/raw", "t10k-labels-idx1-ubyte", 500),
    ("EMNIST/raw", "emnist-letters-train-images-idx3-ubyte", 200),
    ("EMNIST/raw", "emnist-letters-train-labels-idx1-ubyte", 200),
    ("EMNIST/raw", "emnist-letters-test-images-idx3-ubyte", 50),
    ("EMNIST/raw", "emnist-letters-test-labels-idx1-ubyte", 50),
)


def read_raw(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def head_records(raw: bytes, n: int, name: str) -> bytes:
    """The IDX file ``raw`` cut to its first ``n`` records: header with count ``n``, then those records' bytes."""
    if len(raw) < 8 or raw[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{name}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    header_len = 4 + 4 * ndim
    record = 1
    for d in dims[1:]:
        record *= d
    if len(raw) != header_len + dims[0] * record:
        raise SystemExit(f"{name}: header says {dims}, but the file holds {len(raw) - header_len} bytes of data")
    if dims[0] < n:
        raise SystemExit(f"{name}: has {dims[0]} records, fewer than the {n} wanted")
    header = raw[:4] + n.to_bytes(4, "big") + raw[8:header_len]
    return header + raw[header_len: header_len + n * record]


def write_gz(path: Path, data: bytes):
    """Write ``data`` gzipped, reproducibly (no file name, mtime 0), through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=os.environ.get(paths.DATA_ENV_VAR),
                        help=f"full data folder holding MNIST/raw and EMNIST/raw (default: ${paths.DATA_ENV_VAR})")
    parser.add_argument("--out", default=str(paths.DEMO_DATA_ROOT), help="where to write (default: demo/data)")
    args = parser.parse_args(argv)
    if not args.source:
        parser.error(f"--source is required when ${paths.DATA_ENV_VAR} is not set")
    source, out = Path(args.source).expanduser().resolve(), Path(args.out).expanduser().resolve()
    for folder, stem, n in DEMO_FILES:
        candidates = [source / folder / stem, source / folder / (stem + ".gz")]
        src = next((p for p in candidates if p.is_file()), None)
        if src is None:
            raise SystemExit(f"--source {source}: missing {candidates[0]} (or .gz)")
        dst = out / folder / (stem + ".gz")
        write_gz(dst, head_records(read_raw(src), n, str(src)))
        print(f"{dst.relative_to(out)}: first {n} records of {src} ({dst.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
