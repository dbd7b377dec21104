"""Convert one split of an ImageNet-layout folder to an FFCV ``.beton`` file (for ``data=ffcv``).

    python scripts/write_ffcv.py --data-dir /data/imagenet --split train --out /data/ffcv/train.beton
    python scripts/write_ffcv.py --data-dir /data/imagenet --split val --out /data/ffcv/val.beton

``--help`` lists the options; :mod:`spartan.train.data.ffcv_writer` documents the checks and the watchdog.
Exit status: 0 written, 2 bad input (nothing written), 1 the writer failed or timed out (nothing left behind).
"""

import sys

from spartan.train.data.ffcv_writer import main

if __name__ == "__main__":
    sys.exit(main())
