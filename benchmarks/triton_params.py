"""Triton's launch parameters for the Pallas kernels of the chunked form (GPU only): for each pair of
pipeline stages and warps, whether the kernels compile on this chip, how far they are from the XLA
chunked form, and their time against it. `pallas_chunked.TRITON_PARAMS` holds the pair the package
uses; this script sets each pair there in turn.

    python -m benchmarks.triton_params --params=1x4,1x8,2x4,3x4 --lengths=4096 --head_dims=64,128

Flags as `benchmarks.kernels` (lengths, head widths, batch, heads, chunk, rules, repetitions), whose
inputs and functions it times. A pair that does not compile prints the first line of its error.
"""

import sys

import jax
import numpy as np
from absl import app, flags

from benchmarks import kernels
from nl_jax.memory.ops import pallas_chunked

FLAGS = flags.FLAGS
flags.DEFINE_list("params", ["1x4", "1x8", "2x4", "3x4"], "pipeline stages x warps, tried in this order")


def _rel_err(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)) for x, y in zip(a, b))


def main(_):
    if jax.default_backend() != "gpu":
        print(f"triton_params: Triton runs on GPU only; this backend is {jax.default_backend()}")
        sys.exit(1)
    print(f"{jax.devices()[0].device_kind}, batch {FLAGS.batch}, heads {FLAGS.heads}, chunk {FLAGS.chunk}")
    print(
        f"{'stages x warps':>14} {'rule':>13} {'T':>6} {'D':>4} {'pass':>8} {'xla ms':>8} {'pallas ms':>10} "
        f"{'xla/pallas':>10} {'rel err':>8}"
    )
    for rule in FLAGS.rules:
        xla = kernels._fns("xla", rule)
        for dim in map(int, FLAGS.head_dims):
            for length in map(int, FLAGS.lengths):
                args = kernels._inputs(rule, length, dim)
                for pair in FLAGS.params:
                    stages, warps = map(int, pair.split("x"))
                    pallas_chunked.TRITON_PARAMS.update(num_stages=stages, num_warps=warps)
                    pallas_chunked._kernel_call.clear_cache()  # the kernels are built when it traces
                    fns = {"xla": xla, "pallas": kernels._fns("pallas", rule)}
                    for name in ("fwd", "fwd+bwd"):
                        head = f"{pair:>14} {rule:>13} {length:>6} {dim:>4} {name:>8}"
                        try:
                            err = _rel_err(fns["pallas"][name](*args), xla[name](*args))
                            times = kernels.timed(fns, name, args)
                        except Exception as e:  # noqa: BLE001 (a pair the chip refuses is a result)
                            print(f"{head} failed: {kernels.first_line(e)}", flush=True)
                            continue
                        x, p = (float(np.median(times[i])) * 1e3 for i in ("xla", "pallas"))
                        print(f"{head} {x:>8.2f} {p:>10.2f} {x / p:>10.2f} {err:>8.1e}", flush=True)


if __name__ == "__main__":
    app.run(main)
