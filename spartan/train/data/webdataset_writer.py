"""Pack an ImageNet-layout split into WebDataset shards: ``<out>/<split>/shard-000000.tar``, ...

Each sample is ``<key>.jpg`` (the original file's bytes, not re-encoded) and ``<key>.cls`` (the class index,
classes sorted by folder name as torchvision's ImageFolder does). Train with
``python train.py data=webdataset data.path=<out>``.

    python scripts/write_webdataset.py --data-dir /datasets/imagenet --split train --out /datasets/imagenet-wds

``scripts/write_webdataset.py`` is the command line (:func:`main`); :func:`write_shards` does the work.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from spartan.train.data.folders import labelled_images
from spartan.train.errors import ConfigError


def write_shards(data_dir: Path, split: str, out: Path, *, samples_per_shard: int = 1000, seed: int = 0) -> int:
    """Write the shards (samples in a fixed random order, so every shard mixes classes); return the count.

    Labels are indices of the *training* split's sorted class folders; a split with other classes is refused,
    and so is an output folder that already holds shards (stale shards would be read as part of the split).
    """
    if (out / split).is_dir() and any((out / split).glob("*.tar")):
        raise ConfigError(f"--out {str(out / split)!r} already holds shards: remove them or choose another --out")
    files = [(Path(path), label) for path, label in labelled_images(data_dir, split, source="--data-dir")]
    random.Random(seed).shuffle(files)
    (out / split).mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / split / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for index, (path, label) in enumerate(tqdm(files, desc=f"{split} → {out / split}", unit="img")):
            sink.write({"__key__": f"{index:09d}", "jpg": path.read_bytes(), "cls": str(label).encode()})
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with <split>/<class>/<image>")
    parser.add_argument("--split", required=True, help="train or val")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        count = write_shards(
            args.data_dir, args.split, args.out, samples_per_shard=args.samples_per_shard, seed=args.seed
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} samples to {args.out / args.split}")
    return 0
