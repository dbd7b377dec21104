"""Convert one split of an ImageNet-layout folder to an FFCV ``.beton`` file (for ``data=ffcv``).

    python scripts/write_ffcv.py --data-dir /data/imagenet --split train --out /data/ffcv/train.beton
    python scripts/write_ffcv.py --data-dir /data/imagenet --split val --out /data/ffcv/val.beton

``<data-dir>/<split>/<class>/<image>`` is read like torchvision's ImageFolder: classes are the sub-folders sorted
by name, the label of an image is its class's index, images are found recursively by extension (.jpg, .jpeg,
.png, ...). Each record holds ``image`` (``RGBImageField``: the longer side reduced to ``--max-resolution``,
stored as JPEG or raw pixels per ``--write-mode``) and ``label`` (``IntField``). Train with
``data=ffcv data.path=<folder holding train.beton and val.beton>``.

Never a silent or hanging failure:

1. the folder is checked first (missing, no class folders, class folders without images: one-line
   ``error: ...``, exit status 2);
2. every image is fully decoded (``--workers`` processes) before anything is written; unreadable files are
   named and the conversion stops (exit status 2) -- FFCV's ``DatasetWriter`` hangs forever when one of its
   workers raises, so nothing that can fail is left to it;
3. the write runs in a child process (its own process group) under a watchdog: past ``--timeout`` seconds it
   is killed with its workers (exit status 1). Should a writer worker still fail (e.g. a JPEG larger than
   ``--page-size``), it reports the file and stops the whole group at once instead of hanging;
4. the file is written to ``<out>.tmp``, checked (sample count and labels read back) and renamed to ``<out>``
   only then: a failed conversion leaves no ``.beton`` behind (the child also stops, and removes the ``.tmp``,
   if this process dies; only a child killed right after it finished can leave a ``.tmp``).

``--page-size``: FFCV stores samples in pages; a sample must fit in one page, and a file is at least a page
per writer worker. The default is the smallest power of two >= 2 MiB (FFCV's minimum) that holds the largest
raw image at ``--max-resolution`` (2 MiB up to 836 px): tiny test sets stay small (FFCV's own default, 8 MiB,
makes them 16 MB+), and ImageNet-sized sets lose nothing.

Importable: ``write_split(data_dir, split, out, ...)`` does the same and raises :class:`ConversionError`.
``scripts/write_ffcv.py`` is the command line (:func:`main`); the writer child runs this module
(``python -m spartan.train.data.ffcv_writer --_child SPEC``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spartan.train.data.folders import labelled_images
from spartan.train.errors import ConfigError

WRITE_MODES = ("proportion", "jpg", "raw", "smart")
MIN_PAGE_SIZE = 1 << 21  # FFCV's minimum page size
MAX_PAGE_SIZE = 1 << 32  # exclusive, FFCV's limit
DEFAULT_TIMEOUT = 24 * 3600.0
KILL_GRACE_S = 3.0


class ConversionError(Exception):
    """The input cannot be converted (bad folder, unreadable image, bad option); exit status 2."""

    status = 2


class WriteFailed(ConversionError):
    """The FFCV writer failed or ran past the timeout; exit status 1."""

    status = 1


def load_rgb(path: str):
    """The image at ``path`` as a fully decoded PIL RGB image."""
    from PIL import Image

    with open(path, "rb") as f:
        with Image.open(f) as image:
            return image.convert("RGB")


def default_page_size(max_resolution: int) -> int:
    """The smallest power of two >= 2 MiB holding a raw RGB image of ``max_resolution``² pixels."""
    return max(MIN_PAGE_SIZE, 1 << math.ceil(math.log2(max_resolution * max_resolution * 3)))


def find_images(data_dir: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """``[(path, label), ...]`` of ``data_dir/split`` as ImageFolder orders them; a :class:`ConversionError` for a
    missing folder, no class folders, class folders without images or other classes than train/'s."""
    try:
        return labelled_images(Path(data_dir), split, source="--data-dir")
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def _check_image(path: str) -> str | None:
    """None if ``path`` decodes completely to a non-empty RGB image, else ``'path (why)'``."""
    try:
        image = load_rgb(path)
        if image.width == 0 or image.height == 0:
            return f"{path} (empty image)"
    except Exception as err:  # whatever PIL raises for a corrupt, truncated or unsupported file
        return f"{path} ({type(err).__name__}: {err})"
    return None


def _check_images(paths: Sequence[str]) -> list[str | None]:
    return [_check_image(path) for path in paths]


def check_images(paths: Sequence[str], workers: int, deadline: float, progress: bool = True) -> None:
    """Decode every image in ``workers`` processes; a :class:`ConversionError` naming the unreadable ones."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures import TimeoutError as FuturesTimeout
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    bad: list[str] = []
    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress)
    if workers <= 1:
        for path in paths:
            if time.monotonic() > deadline:
                raise WriteFailed("checking the images did not finish within --timeout")
            problem = _check_image(path)
            if problem:
                bad.append(problem)
            bar.update()
    else:
        size = max(1, min(64, len(paths) // (workers * 4)))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        # A worker that dies (a decoder crash, the OOM killer) breaks the executor at once instead of leaving
        # its chunk pending until the deadline.
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_check_images, chunk): chunk for chunk in chunks}
            try:
                for future in as_completed(futures, timeout=max(0.0, deadline - time.monotonic())):
                    try:
                        problems = future.result()
                    except BrokenProcessPool:
                        chunk = futures[future]
                        raise WriteFailed(
                            f"a worker died while decoding one of {chunk[0]} ... {chunk[-1]} "
                            f"({len(chunk)} files): check them with PIL"
                        ) from None
                    bad += [problem for problem in problems if problem]
                    bar.update(len(problems))
            except FuturesTimeout:
                pool.shutdown(wait=False, cancel_futures=True)
                raise WriteFailed("checking the images did not finish within --timeout") from None
    bar.close()
    if bad:
        bad.sort()
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ConversionError(f"{len(bad)} unreadable image(s), fix or remove them and convert again: {shown}")


def _check_options(
    max_resolution: int,
    write_mode: str,
    compress_probability: float,
    jpeg_quality: int,
    smart_threshold: int | None,
    workers: int,
    chunk_size: int,
    page_size: int,
    timeout: float,
) -> None:
    def positive_int(name: str, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConversionError(f"{name} must be an integer > 0, got {value!r}")

    for name, value in (
        ("--max-resolution", max_resolution),
        ("--workers", workers),
        ("--chunk-size", chunk_size),
        ("--page-size", page_size),
    ):
        positive_int(name, value)
    if smart_threshold is not None:
        positive_int("--smart-threshold", smart_threshold)
    if max_resolution > 65535:
        raise ConversionError(f"--max-resolution must be <= 65535 (FFCV stores 16-bit sizes), got {max_resolution}")
    if write_mode not in WRITE_MODES:
        raise ConversionError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if not 0 <= compress_probability <= 1:
        raise ConversionError(f"--compress-probability must be in [0, 1], got {compress_probability!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise ConversionError(f"--jpeg-quality must be an integer in [1, 100], got {jpeg_quality!r}")
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size < MAX_PAGE_SIZE:
        raise ConversionError(
            f"--page-size must be a power of two >= 2 MiB ({MIN_PAGE_SIZE}) and < 4 GiB, got {page_size}"
        )
    largest_raw = max_resolution * max_resolution * 3
    if write_mode != "jpg" and page_size < largest_raw:
        raise ConversionError(
            f"--page-size {page_size} cannot hold a raw {max_resolution}x{max_resolution} image "
            f"({largest_raw} bytes; --write-mode {write_mode} may store images raw): use at "
            f"least {default_page_size(max_resolution)} or omit --page-size"
        )
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ConversionError(f"--timeout must be a number of seconds > 0, got {timeout!r}")


def write_split(
    data_dir: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    max_resolution: int = 512,
    write_mode: str = "proportion",
    compress_probability: float = 0.5,
    jpeg_quality: int = 90,
    smart_threshold: int | None = None,
    workers: int | None = None,
    chunk_size: int = 100,
    page_size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> int:
    """Write ``data_dir/split`` to the FFCV file ``out`` (see the module docstring); returns the image count.

    Raises :class:`ConversionError` (bad input, nothing written) or :class:`WriteFailed` (the writer failed or
    ran past ``timeout`` seconds, counted from the call; killed, nothing left behind).
    """
    deadline = time.monotonic() + timeout if isinstance(timeout, (int, float)) and timeout > 0 else 0.0
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if page_size is None:
        valid = isinstance(max_resolution, int) and 0 < max_resolution <= 65535
        page_size = default_page_size(max_resolution) if valid else MIN_PAGE_SIZE
    _check_options(
        max_resolution,
        write_mode,
        compress_probability,
        jpeg_quality,
        smart_threshold,
        workers,
        chunk_size,
        page_size,
        timeout,
    )
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"--out {str(out)!r} is a directory; name the .beton file to write")
    samples = find_images(data_dir, split)
    check_images([path for path, _ in samples], workers, deadline, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    spec = {
        "out": str(tmp),
        "samples": samples,
        "max_resolution": max_resolution,
        "write_mode": write_mode,
        "compress_probability": compress_probability,
        "jpeg_quality": jpeg_quality,
        "smart_threshold": smart_threshold,
        "workers": workers,
        "chunk_size": chunk_size,
        "page_size": page_size,
        "parent": os.getpid(),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="write_ffcv_") as scratch:
            spec["error_file"] = os.path.join(scratch, "error.txt")
            spec_file = os.path.join(scratch, "spec.json")
            with open(spec_file, "w") as f:
                json.dump(spec, f)
            _run_writer(spec_file, spec["error_file"], deadline, timeout, progress)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(samples)


def _run_writer(spec_file: str, error_file: str, deadline: float, timeout: float, progress: bool) -> None:
    """Run :func:`_child_main` in a new process group; kill the group past ``deadline``."""
    env = dict(os.environ)
    if not progress:
        env["TQDM_DISABLE"] = "1"
    # __spec__.name: this module's import name, also when it runs as ``python -m``
    proc = subprocess.Popen(
        [sys.executable, "-m", __spec__.name, "--_child", spec_file],
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _stop_group(proc)  # the writer's workers too (also after Ctrl-C in this process)
    if rc is None:
        raise WriteFailed(f"the FFCV writer did not finish within --timeout {timeout:g} s and was killed")
    if rc != 0:
        reason = Path(error_file).read_text().strip().splitlines() if os.path.exists(error_file) else []
        raise WriteFailed(reason[0] if reason else f"the FFCV writer failed (exit status {rc}), see above")


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the writer's process group (multiprocessing's resource tracker ignores it and then frees the
    shared memory), wait a little, SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    end = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < end and _group_alive(proc.pid):
        time.sleep(0.05)
    if _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ----------------------------------------------------------------------------------------------------------
# The child process: runs FFCV's DatasetWriter.


class _Samples:
    """``(uint8 H×W×3 image, label)`` per file; remembers the file being read (named if a worker fails)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples
        self.current: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import numpy as np

        path, label = self.samples[index]
        self.current = path
        return np.asarray(load_rgb(path)), label


_ERROR_FILE: str | None = None


def _fail_group(message: str) -> None:
    """Record ``message`` for the parent and stop this writer's whole process group (no hang)."""
    if _ERROR_FILE:
        with open(_ERROR_FILE, "a") as f:
            f.write(message.replace("\n", " ") + "\n")
    print(f"error: {message}", file=sys.stderr, flush=True)
    os.killpg(os.getpgrp(), signal.SIGTERM)


def _guarded_worker(*args: Any) -> None:
    """FFCV's indexed-dataset worker; an exception stops the group instead of leaving the writer waiting."""
    from ffcv.writer import worker_job_indexed_dataset

    samples = args[-1]
    try:
        worker_job_indexed_dataset(*args)
    except BaseException as err:
        where = f" while writing {samples.current}" if samples.current else ""
        _fail_group(f"the FFCV writer failed{where}: {type(err).__name__}: {err}")
        raise


def _watch_parent(parent: int, out: str) -> None:
    """Stop the writer if the parent (the watchdog) dies: nobody would collect or clean up its file."""
    while os.getppid() == parent:
        time.sleep(1.0)
    try:
        os.unlink(out)
    except OSError:
        pass
    os.killpg(os.getpgrp(), signal.SIGTERM)


def _child_main(spec_file: str) -> int:
    global _ERROR_FILE
    with open(spec_file) as f:
        spec = json.load(f)
    _ERROR_FILE = spec["error_file"]
    if os.getpgrp() != os.getpid():
        os.setpgrp()
    threading.Thread(target=_watch_parent, args=(spec["parent"], spec["out"]), daemon=True).start()
    try:
        return _write(spec)
    except Exception as err:  # stop the writer's workers too: they would keep this process alive
        _fail_group(f"the FFCV writer failed: {type(err).__name__}: {err}")
        raise


def _write(spec: dict) -> int:
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    samples = _Samples([(path, label) for path, label in spec["samples"]])
    fields = {
        "image": RGBImageField(
            write_mode=spec["write_mode"],
            max_resolution=spec["max_resolution"],
            smart_threshold=spec["smart_threshold"],
            jpeg_quality=spec["jpeg_quality"],
            compress_probability=spec["compress_probability"],
        ),
        "label": IntField(),
    }
    writer = DatasetWriter(spec["out"], fields, page_size=spec["page_size"], num_workers=spec["workers"])
    if hasattr(writer, "_write_common"):  # FFCV 1.0: from_indexed_dataset, with the guarded worker
        writer._write_common(
            len(samples), chunks(list(enumerate(range(len(samples)))), spec["chunk_size"]), _guarded_worker, (samples,)
        )
    else:  # another FFCV version: unguarded (pre-validation and the parent's timeout still apply)
        writer.from_indexed_dataset(samples, chunksize=spec["chunk_size"])

    reader = Reader(spec["out"])  # read back what was written
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    expected = np.array([label for _, label in spec["samples"]], dtype=labels.dtype)
    if int(reader.num_samples) != len(samples) or not np.array_equal(labels, expected):
        _fail_group(
            f"{spec['out']} reads back {int(reader.num_samples)} samples or wrong labels, expected {len(samples)}"
        )
    return 0


# ----------------------------------------------------------------------------------------------------------


def _size(text: str) -> int:
    """``2097152``, ``1<<21``, ``2M``, ``2MiB`` → bytes."""
    value = text.strip().replace("_", "")
    if "<<" in value:
        base, shift = value.split("<<")
        return int(base) << int(shift)
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    lowered = value.lower().removesuffix("ib").removesuffix("b")
    if lowered and lowered[-1] in units:
        return int(float(lowered[:-1]) * units[lowered[-1]])
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert <data-dir>/<split>/<class>/<image> to an FFCV .beton file.",
        epilog="Exit status: 0 written, 2 bad input (nothing written), 1 the writer "
        "failed or timed out (nothing left behind).",
    )
    parser.add_argument("--data-dir", required=True, help="the ImageNet-layout folder (holding <split>/)")
    parser.add_argument("--split", required=True, help="the sub-folder to convert: train or val")
    parser.add_argument("--out", required=True, help="the .beton file to write (replaced atomically)")
    parser.add_argument(
        "--max-resolution", type=int, default=512, help="longer image side after resizing, in pixels (default 512)"
    )
    parser.add_argument(
        "--write-mode",
        choices=WRITE_MODES,
        default="proportion",
        help="jpg: JPEG; raw: pixels; proportion: JPEG with --compress-probability, else raw; "
        "smart: raw unless larger than --smart-threshold bytes (default proportion)",
    )
    parser.add_argument("--compress-probability", type=float, default=0.5, help="for proportion (default 0.5)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="1-100 (default 90)")
    parser.add_argument(
        "--smart-threshold",
        type=_size,
        default=None,
        help="for smart: JPEG-compress images whose raw size exceeds this many bytes",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that check and write images (default: all cores)",
    )
    parser.add_argument("--chunk-size", type=int, default=100, help="images per writer work item (default 100)")
    parser.add_argument(
        "--page-size",
        type=_size,
        default=None,
        help="bytes, a power of two >= 2 MiB, e.g. 2M or 1<<21 (default: the smallest that holds "
        "a raw --max-resolution image, at least 2 MiB)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before the conversion is killed (default 86400)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        return _child_main(argv[1])
    args = parse_args(argv)
    start = time.monotonic()
    try:
        count = write_split(
            args.data_dir,
            args.split,
            args.out,
            max_resolution=args.max_resolution,
            write_mode=args.write_mode,
            compress_probability=args.compress_probability,
            jpeg_quality=args.jpeg_quality,
            smart_threshold=args.smart_threshold,
            workers=args.workers,
            chunk_size=args.chunk_size,
            page_size=args.page_size,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    size = os.path.getsize(args.out) / 2**20
    print(
        f"wrote {count} images of {args.data_dir}/{args.split} to {args.out} ({size:.1f} MiB) in "
        f"{time.monotonic() - start:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
