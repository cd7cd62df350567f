"""Prune any Flax model: channel groups found in the traced program (linen and NNX).

`trace` is the entry point; `TracedNet` the traced network. How groups are found:
`jaxprune.trace.analysis`; how gated and pruned programs run: `jaxprune.trace.interpret`.
"""

from jaxprune.trace.net import TracedNet, trace

__all__ = ["TracedNet", "trace"]
