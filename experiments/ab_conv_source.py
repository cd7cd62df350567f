"""Two versions of the CPU layer's kernel source (`jaxprune/cpu/_onednn/conv.cc`), timed against
each other on the same convolutions, in one process, in alternating rounds.

Run-to-run drift of a shared machine (tens of percent on the VM of RESULTS section 3) hides
changes of a few percent between two benchmark processes; alternating the two builds round by
round in one process exposes both to the same drift. Each version is compiled with its FFI symbols
renamed (``jaxprune_`` -> ``ab<i>_``) so both load side by side; their outputs are checked equal to
float32 rounding before timing.

  python experiments/ab_conv_source.py --base HEAD~1 --shapes 256x16x16x24x24,256x8x8x48x48

``--base``/``--head``: git revisions (``WORKTREE`` for the file as it is on disk; the default head).
``--target``: the handler timed (default the Winograd forward pass). Shapes are
``NxHxWxC_INxC_OUT`` of 3x3, stride-1, padding-1 convolutions. Prints a markdown table.
"""

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.cpu import onednn

SOURCE = "jaxprune/cpu/_onednn/conv.cc"
ROOT = Path(__file__).resolve().parent.parent


def source_at(revision: str) -> str:
    if revision == "WORKTREE":
        return (ROOT / SOURCE).read_text()
    return subprocess.run(
        ["git", "show", f"{revision}:{SOURCE}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def load_version(source: str, prefix: str, target: str, workdir: Path) -> str:
    """Compiles ``source`` with its symbols renamed to ``prefix``; registers ``target``; returns
    the registered name."""
    renamed = workdir / f"{prefix}.cc"
    renamed.write_text(source.replace("jaxprune_", f"{prefix}_"))
    library = workdir / f"{prefix}.so"
    # The library's own compile command (flags included), on the renamed copy.
    subprocess.run(onednn._compile_command(library, renamed), capture_output=True, check=True)
    name = target.replace("jaxprune_", f"{prefix}_")
    handler = getattr(ctypes.CDLL(str(library)), name)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return name


def conv_fn(name: str, out_shape: tuple):
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out_shape, jnp.float32))
    return jax.jit(lambda x, k: call(x, k, stride=np.int64(1), padding=np.int64(1)))


def main(argv=None) -> list[dict]:
    """Prints the table; returns its rows (shape, each version's times in ms)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--head", default="WORKTREE")
    parser.add_argument("--shapes", required=True)
    parser.add_argument("--target", default="jaxprune_conv_fwd_winograd")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="calls per round")
    args = parser.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    versions = {"base": args.base, "head": args.head}
    with tempfile.TemporaryDirectory() as tmp:
        names = {
            label: load_version(source_at(rev), f"ab{i}", args.target, Path(tmp))
            for i, (label, rev) in enumerate(versions.items())
        }
        print(
            f"`{args.target}`, base `{args.base}`, head `{args.head}`; ms per call, "
            f"{args.rounds} alternating rounds of {args.calls} calls\n"
        )
        print(
            "| N x H x W x C_in -> C_out | base min | base median | head min | head median "
            "| base / head (medians) |"
        )
        print("|---|---|---|---|---|---|")
        rng, rows = np.random.default_rng(0), []
        for n, h, w, c_in, c_out in shapes:
            x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), jnp.float32)
            # The input gradient's kernel is the forward pass's, [3, 3, C_out, C_in]: C_in -> C_out.
            backward = "bwd_data" in args.target
            kernel_shape = (3, 3, c_out, c_in) if backward else (3, 3, c_in, c_out)
            kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
            fns = {label: conv_fn(name, (n, h, w, c_out)) for label, name in names.items()}
            outputs = {label: np.asarray(fn(x, kernel)) for label, fn in fns.items()}
            scale = np.abs(outputs["base"]).max()
            if not np.allclose(outputs["head"], outputs["base"], rtol=1e-4, atol=1e-5 * scale):
                sys.exit(f"{(n, h, w, c_in, c_out)}: the two versions' outputs differ")
            times = {label: [] for label in fns}
            for _ in range(args.rounds):
                for label, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        y = fn(x, kernel)
                    y.block_until_ready()
                    times[label].append((time.perf_counter() - start) / args.calls * 1e3)
            base, head = (statistics.median(times[k]) for k in ("base", "head"))
            cells = [min(times["base"]), base, min(times["head"]), head]
            row = " | ".join(f"{ms:.2f}" for ms in cells)
            print(f"| {n}x{h}x{w}x{c_in} -> {c_out} | {row} | {base / head:.2f}x |", flush=True)
            rows.append({"shape": (n, h, w, c_in, c_out), "ms": times})
    return rows


if __name__ == "__main__":
    main()
