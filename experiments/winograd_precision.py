"""Rounding error of the CPU convolutions against a float64 reference (RESULTS.md section 3,
"Winograd's F(2x2, 3x3), and oneDNN's forward convolutions as input gradients").

Winograd's F(2x2, 3x3) adds and subtracts transformed inputs before multiplying, so its rounding
differs from a direct convolution's. This measures both on float32 inputs against
`lax.conv_general_dilated` in float64, for the layer shapes of CIFAR ResNet-56 and VGG-16 at
batch 16: XLA's convolution, oneDNN's direct one, and the Winograd form, forward pass and input
gradient (the two directions Winograd computes).

  python experiments/winograd_precision.py [--out experiments/results/3_winograd_precision.json]

Prints a markdown table: the largest error over the largest magnitude of the result, and the
root-mean-square error over the result's root mean square.
"""

import argparse
import json
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxprune.cpu import onednn  # noqa: E402
from jaxprune.ops import conv2d  # noqa: E402

# (C_in, C_out, pixels per side): 3x3, stride 1, padding 1.
SHAPES = [(16, 16, 32), (32, 32, 16), (64, 64, 8), (64, 64, 32), (256, 256, 8), (512, 512, 4)]
BATCH = 16


def _errors(got, want):
    err = jnp.abs(got.astype(jnp.float64) - want)
    return (
        float(jnp.max(err) / jnp.max(jnp.abs(want))),
        float(jnp.sqrt(jnp.mean(err**2) / jnp.mean(want**2))),
    )


def measure(c_in: int, c_out: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, size, size, c_in))
    kernel = rng.normal(size=(3, 3, c_in, c_out)) / np.sqrt(9 * c_in)
    dy = rng.normal(size=(BATCH, size, size, c_out))
    x32, kernel32, dy32 = (jnp.asarray(a, jnp.float32) for a in (x, kernel, dy))

    def input_grad(conv, kernel, dy):
        return jax.vjp(lambda x: conv(x, kernel), jnp.zeros(x.shape, dy.dtype))[1](dy)[0]

    reference = {
        "forward": conv2d(jnp.asarray(x), jnp.asarray(kernel), 1, 1, impl="xla"),
        "input_grad": input_grad(
            lambda x, k: conv2d(x, k, 1, 1, impl="xla"), jnp.asarray(kernel), jnp.asarray(dy)
        ),
    }
    convs = {
        "xla": lambda x, k: conv2d(x, k, 1, 1, impl="xla"),
        "onednn": lambda x, k: onednn.conv_forward(x, k, 1, 1),
        "winograd": lambda x, k: onednn.conv_forward(x, k, 1, 1, winograd=True),
    }
    row = {"c_in": c_in, "c_out": c_out, "pixels": size}
    for name, conv in convs.items():
        forward = jax.jit(conv)(x32, kernel32)
        backward = jax.jit(lambda k, dy, conv=conv: input_grad(conv, k, dy))(kernel32, dy32)
        row[name] = {
            "forward": _errors(forward, reference["forward"]),
            "input_grad": _errors(backward, reference["input_grad"]),
        }
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not onednn.winograd_supported():
        print("winograd_precision: oneDNN's library or an AVX2 CPU is missing", file=sys.stderr)
        return 1
    rows = [measure(*shape) for shape in SHAPES]
    columns = " | ".join(f"{name} max / rms" for name in ("xla", "onednn", "winograd"))
    print(f"| C_in->C_out, pixels | direction | {columns} |")
    print("|---|---|---|---|---|")
    for row in rows:
        for direction in ("forward", "input_grad"):
            cells = [
                "{:.1e} / {:.1e}".format(*row[name][direction])
                for name in ("xla", "onednn", "winograd")
            ]
            shape = f"{row['c_in']}->{row['c_out']}, {row['pixels']}x{row['pixels']}"
            print(f"| {shape} | {direction} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": BATCH, "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
