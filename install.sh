#!/usr/bin/env bash
# Sets up jaxprune on a fresh Debian/Ubuntu machine: the real Fashion-MNIST (Debian package
# dataset-fashion-mnist, the built-in default dataset) and a virtualenv .venv with jaxprune in it.
set -euo pipefail
cd "$(dirname "$0")"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "jaxprune installed in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
