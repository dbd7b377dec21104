"""Pack one split of an ImageNet-layout folder into WebDataset shards (for ``data=webdataset``).

    python scripts/write_webdataset.py --data-dir /datasets/imagenet --split train --out /datasets/imagenet-wds

``--help`` lists the options; :mod:`spartan.train.data.webdataset_writer` documents the shard layout.
Exit status: 0 written, 2 bad input.
"""

import sys

from spartan.train.data.webdataset_writer import main

if __name__ == "__main__":
    sys.exit(main())
