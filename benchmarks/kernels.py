"""The Pallas kernels of the chunked form against the XLA chunked form, forward and forward+backward:
the gated delta rule (`presets.gated_delta_rule`, what Gated DeltaNet runs) and Titans' update
(weight decay and momentum) on a linear and on an MLP memory (`presets.titans`).

    python -m benchmarks.kernels                                   # T 2048..16384, head widths 64,128,256
    python -m benchmarks.kernels --lengths=4096 --head_dims=128
    python -m benchmarks.kernels --allow_interpret --lengths=64 --head_dims=16 --batch=1 --heads=1  # CPU

Both implementations compute the same function (tests/memory/test_pallas_chunked.py). Timings are
medians over repetitions that alternate between the two, so machine noise hits both alike; the
ratios (xla time / pallas time, > 1: the kernel is faster) are measured in this one run. On CPU the
kernel only runs in Pallas interpret mode, which is no speed measurement, so the script refuses
unless --allow_interpret (a smoke run at tiny shapes). On GPU the kernels run through Triton in
their loop layout, on TPU through Mosaic in their grid layout (nl_jax/memory/ops/pallas_chunked.py).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nl_jax.memory import ops
from nl_jax.memory.ops import presets

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["2048", "4096", "8192", "16384"], "sequence lengths")
flags.DEFINE_list("head_dims", ["64", "128", "256"], "key width per head (values as wide)")
flags.DEFINE_integer("batch", 4, "batch size")
flags.DEFINE_integer("heads", 8, "heads")
flags.DEFINE_integer("chunk", 64, "chunk size")
flags.DEFINE_list("rules", ["gated_delta", "titans_linear", "titans_mlp"], "update rules (RULES below)")
flags.DEFINE_integer("reps", 5, "timed repetitions per implementation and shape")
flags.DEFINE_bool("allow_interpret", False, "on CPU, run the kernel in interpret mode anyway (smoke run)")


def _inputs(rule, length, dim):
    ks = jax.random.split(jax.random.key(0), 6)
    shape = (FLAGS.batch, length, FLAGS.heads, dim)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], shape)), unit(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], shape)
    alpha = jax.nn.sigmoid(3.0 + jax.random.normal(ks[3], shape[:3]))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:3]))
    spec = RULES[rule][0](alpha, beta).spec
    weights = ops.init_weights(spec, ks[5], (FLAGS.batch, FLAGS.heads), dim, hidden=dim)
    return weights, q, k, v, alpha, beta


def _titans(structure):
    return lambda alpha, beta: presets.titans(0.1 * beta, 1 - alpha, beta, structure, activation="silu")


RULES = {
    # (mechanism from the gates, whether it carries momentum)
    "gated_delta": (lambda alpha, beta: presets.gated_delta_rule(alpha, beta), False),
    "titans_linear": (_titans("linear"), True),
    "titans_mlp": (_titans("mlp"), True),
}


def _fns(impl, rule):
    mechanism, momentum = RULES[rule]

    def run(weights, q, k, v, alpha, beta):
        m = mechanism(alpha, beta)
        state = ops.init_state(weights, momentum=momentum)
        kw = dict(chunk_size=FLAGS.chunk, read=m.read, impl=impl)
        y, s = ops.memory_chunked(m.spec, state, q, k, v, m.rates, **kw)
        return y, s.weights

    def loss(*args):
        y, w = run(*args)
        return jnp.sum(y * y) + sum(jnp.sum(x * x) for x in w)

    return {"fwd": jax.jit(run), "fwd+bwd": jax.jit(jax.grad(loss, argnums=range(6)))}


def _time(f, args):
    jax.block_until_ready(f(*args))  # untimed call of the same function first
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def timed(fns, name: str, args) -> dict[str, list[float]]:
    """Seconds per call of each implementation's `name` pass, alternating between them."""
    times = {impl: [] for impl in fns}
    for _ in range(FLAGS.reps):
        for impl in fns:
            times[impl].append(_time(fns[impl][name], args))
    return times


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def main(_):
    backend = jax.default_backend()
    unknown = sorted(set(FLAGS.rules) - set(RULES))
    if unknown:
        raise app.UsageError(f"--rules: unknown {unknown}; choose from {sorted(RULES)}")
    if backend == "cpu" and not FLAGS.allow_interpret:
        print(
            "kernels: refused on CPU, the kernel runs in Pallas interpret mode there, which is no speed "
            "measurement (pass --allow_interpret for a smoke run at tiny shapes)"
        )
        sys.exit(1)
    print(f"backend {backend}, batch {FLAGS.batch}, heads {FLAGS.heads}, chunk {FLAGS.chunk}")
    print(f"{'rule':>13} {'T':>6} {'D':>4} {'pass':>8} {'xla ms':>9} {'pallas ms':>10} {'xla/pallas':>10}")
    for rule in FLAGS.rules:
        fns = {impl: _fns(impl, rule) for impl in ops.IMPLS}
        for dim in map(int, FLAGS.head_dims):
            for length in map(int, FLAGS.lengths):
                args = _inputs(rule, length, dim)
                for name in ("fwd", "fwd+bwd"):
                    head = f"{rule:>13} {length:>6} {dim:>4} {name:>8}"
                    try:
                        times = timed(fns, name, args)
                    except Exception as e:  # noqa: BLE001 (a shape the chip refuses is a result; go on)
                        print(f"{head} failed: {first_line(e)}", flush=True)
                        continue
                    x, p = (float(np.median(times[i])) * 1e3 for i in ops.IMPLS)
                    print(f"{head} {x:>9.2f} {p:>10.2f} {x / p:>10.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
