#!/usr/bin/env bash
# Installs unrollattn with its test tools, and (as root) the offline Debian data the recipes use.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
            || echo "install.sh: dataset-fashion-mnist not installed; recipes fall back to scikit-learn digits" >&2
    fi
else
    echo "install.sh: not root, skipping 'apt-get install dataset-fashion-mnist' (recipes fall back to digits)" >&2
fi
# torch 2.14.1 + torchvision 0.29.1 are the releases this machine kind serves from local disk.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
