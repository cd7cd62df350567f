"""XLA's whole-network flop count against jaxprune's MACs (a measurement, not a test).

On a whole network XLA's convolution cost model leaves out the taps that fall on SAME padding, so
``cost_analysis()['flops']`` reads below 2 x MACs (the pruning papers' count, `jp.count_macs`).
The ratio depends on XLA's version and cost model, so it is reported here, not asserted in tests.

    python experiments/xla_flops.py [--models resnet56 vgg16] [--json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import jaxprune as jp
from jaxprune.ops import conv_impl


def ratio(name: str) -> float:
    """XLA's flops of one image's forward pass over 2 x MACs, with plain `lax` convolutions."""
    arch = jp.models.create(name)
    model = arch.module()
    x = jnp.zeros((1, *arch.input_shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with conv_impl("xla"):
        cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    return flops / (2 * jp.count_macs(arch))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = {"jax": jax.__version__, "ratios": {m: ratio(m) for m in args.models}}
    if args.json:
        print(json.dumps(result))
    else:
        for model, value in result["ratios"].items():
            print(f"{model}: XLA flops / (2 x MACs) = {value:.3f}")
    return result


if __name__ == "__main__":
    main()
