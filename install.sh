#!/usr/bin/env bash
# Sets up jaxprune on a fresh Debian/Ubuntu machine: the real Fashion-MNIST (Debian package
# dataset-fashion-mnist, the built-in default dataset), tcmalloc (libtcmalloc-minimal4, which the
# `jaxprune` command runs under: 13-26% faster on CPU, RESULTS.md section 3), oneDNN's headers and
# library (libdnnl-dev: jaxprune's CPU convolutions, jaxprune.cpu.onednn), a C++ compiler, and a
# virtualenv .venv with jaxprune in it; then it compiles jaxprune's oneDNN library ahead of use.
set -euo pipefail
cd "$(dirname "$0")"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
/sbin/ldconfig -p | grep -q libtcmalloc_minimal.so.4 || packages+=(libtcmalloc-minimal4)
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || packages+=(libdnnl-dev)
command -v c++ >/dev/null || packages+=(g++)
if [ ${#packages[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}"
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -m jaxprune.cpu.onednn
echo "jaxprune installed in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
