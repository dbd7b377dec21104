#!/usr/bin/env bash
# Create .venv with the pinned requirements. Idempotent: `make` calls it only when requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# FFCV compiles against libturbojpeg and OpenCV; pip cannot install those.
if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    apt_cmd="apt-get update && apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev libopencv-dev"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing system libraries for FFCV"
        DEBIAN_FRONTEND=noninteractive bash -c "$apt_cmd" >/dev/null
    else
        echo "setup: FFCV needs system libraries; run as root: $apt_cmd" >&2
        exit 1
    fi
fi

# data=fashion_mnist reads the Debian package's IDX files (30 MB, offline); optional: only that option needs them.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing dataset-fashion-mnist (for data=fashion_mnist)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null \
            || echo "setup: could not install dataset-fashion-mnist; data=fashion_mnist needs data.path" >&2
    else
        echo "setup: for data=fashion_mnist, run as root: apt-get install -y dataset-fashion-mnist" >&2
    fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "setup: Python 3.11 is required (found $("$python" --version 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
touch .venv/.installed
