"""Images/s of the training input pipeline (RandomResizedCrop 224 + flip + normalize) for each loader.

Generates an ImageNet-like JPEG folder (default 2,000 images of 400–500 px, 10 classes) once, converts it to
FFCV (.beton) and WebDataset (.tar shards), then times each loader as the trainer builds it
(``spartan.train.data.build_loaders``), with the same workers and batch size, over epochs 2..N (epoch 1 is
excluded: FFCV compiles its pipeline then, and the OS page cache warms up). ``ffcv_stock`` is the same FFCV file
and pipeline built from FFCV's own operations, to show what ``data=ffcv``'s decoder adds. Prints a markdown table
and writes JSON.

    python scripts/bench_loaders.py                       # → docs/bench_loaders_cpu.json
    python scripts/bench_loaders.py --images 5000 --workers 16 --out docs/bench_loaders_gpu_host.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spartan.train.data import Loaders, build_loaders, get_backend
from spartan.train.data.backends.ffcv import FFCVConfig
from spartan.train.data.ffcv_writer import write_split
from spartan.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spartan.train.data.webdataset_writer import write_shards


def make_images(root: Path, count: int, classes: int, seed: int = 0) -> None:
    """JPEGs (quality 90) of 400–500 px sides with smooth class-dependent colour fields plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(classes, count // 10))):
        for i in range(n):
            label = i % classes
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(400, 501, size=2))
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([(x * (label + 1)) % 256, (y * 3) % 256, ((x + y) * (classes - label)) % 256], axis=-1)
            noise = rng.integers(0, 48, size=(h, w, 3))
            Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


def stock_ffcv_loaders(config: FFCVConfig) -> Loaders:
    """The same training pipeline from FFCV's own operations (its ImageNet example's), for comparison with
    ``data=ffcv``'s decoder: crop+resize decoder, flip, normalize, to tensor, to device, to torch image."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    cpu = torch.device("cpu")
    image = [
        RandomResizedCropRGBImageDecoder((config.image_size, config.image_size)),
        RandomHorizontalFlip(),
        NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32),
        ToTensor(),
        ToDevice(cpu),
        ToTorchImage(),
    ]
    loader = Loader(
        str(Path(config.path) / "train.beton"),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        os_cache=config.os_cache,
        order=OrderOption.QUASI_RANDOM,
        drop_last=True,
        pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)]},
    )
    return Loaders(loader, [], None)


def time_loader(loaders: Loaders, epochs: int) -> dict:
    rates, first = [], None
    for epoch in range(epochs):
        loaders.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch, _ in loaders.train:
            images += len(batch)
        seconds = time.perf_counter() - start
        if epoch == 0:
            first = images / seconds
        else:
            rates.append(images / seconds)
    return {
        "images_per_epoch": images,
        "first_epoch_img_s": first,
        "img_s": float(np.median(rates)),
        "img_s_per_epoch": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs are 2..N")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/spartan_bench_loaders"))
    parser.add_argument(
        "--loaders",
        nargs="+",
        default=["ffcv", "ffcv_stock", "imagefolder", "webdataset"],
        choices=["ffcv", "ffcv_stock", "imagefolder", "webdataset"],
        help="ffcv_stock: the same pipeline from FFCV's own operations instead of data=ffcv's",
    )
    parser.add_argument(
        "--os-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FFCV reads through the OS page cache (its recipe when the data fits in RAM, as here)",
    )
    parser.add_argument(
        "--ffcv-write-mode",
        default="proportion",
        choices=["proportion", "jpg", "raw"],
        help="how the training .beton stores images (the recipe: proportion)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench_loaders_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' workers do the work; the main process only collects batches

    folder = args.cache / f"jpeg_{args.images}"
    if not (folder / "val").is_dir():
        print(f"generating {args.images} JPEGs in {folder} ...", flush=True)
        make_images(folder, args.images, args.classes)
    ffcv_dir = args.cache / f"ffcv_{args.ffcv_write_mode}"
    if {"ffcv", "ffcv_stock"} & set(args.loaders) and not (ffcv_dir / "val.beton").exists():
        for split in ("train", "val"):
            # FFCV's ImageNet recipe: at most 512 px, half of the training images stored as raw pixels.
            write_split(
                folder,
                split,
                ffcv_dir / f"{split}.beton",
                max_resolution=512,
                write_mode=args.ffcv_write_mode if split == "train" else "jpg",
                compress_probability=0.5,
                jpeg_quality=90,
                workers=args.workers,
            )
    if "webdataset" in args.loaders and not (args.cache / "wds" / "val").is_dir():
        for split in ("train", "val"):
            write_shards(folder, split, args.cache / "wds", samples_per_shard=250)

    paths = {"ffcv": ffcv_dir, "ffcv_stock": ffcv_dir, "imagefolder": folder, "webdataset": args.cache / "wds"}
    results = {}
    for name in args.loaders:
        backend = name.removesuffix("_stock")
        options = {
            "ffcv": {"num_classes": args.classes, "os_cache": args.os_cache},
            "webdataset": {"num_classes": args.classes, "shuffle_buffer": 1000},
        }.get(backend, {})
        config = get_backend(backend).schema(
            path=str(paths[name]), image_size=224, batch_size=args.batch_size, num_workers=args.workers, **options
        )
        loaders = stock_ffcv_loaders(config) if name == "ffcv_stock" else build_loaders(config, seed=0)
        results[name] = time_loader(loaders, args.epochs)
        print(f"{name}: {results[name]['img_s']:,.0f} img/s", flush=True)

    baseline = results.get("imagefolder", {}).get("img_s")
    lines = [
        f"| loader | img/s (median of epochs 2–{args.epochs}) | first epoch img/s | vs ImageFolder |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['img_s'] / baseline:.2f}×" if baseline else "–"
        lines.append(f"| {name} | {r['img_s']:,.0f} | {r['first_epoch_img_s']:,.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    meta = {
        "images": args.images,
        "image_sides_px": [400, 500],
        "workers": args.workers,
        "os_cache": args.os_cache,
        "ffcv_write_mode": args.ffcv_write_mode,
        "batch_size": args.batch_size,
        "resolution": 224,
        "epochs": args.epochs,
        "torch": str(torch.__version__),
        "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
