"""Forward+backward time of the chunked memory form against the token-by-token reference.

    python -m benchmarks.memory_ops                       # 2-layer MLP memory, lengths 512..8192
    python -m benchmarks.memory_ops --read=per_token --dim=64 --hidden=64
    python -m benchmarks.memory_ops --structure=linear --lengths=512,2048

Both forms compute the same function (same chunk semantics). The defaults are the output memory of
the sized HOPE configs (experiments/configs/hope_base.py with hope_340m..1_3b): the self-modifying
Titans rule (L2 objective, DGD + retention + momentum) on a 2-layer MLP memory with heads of 128,
chunks of 64, the paper's boundary read and no per-chunk remat. Timings are medians over
repetitions that alternate between the two forms, so machine noise hits both alike (each timed call
follows an untimed one of the same form); the speed-up is the ratio measured in this one run.
"""

import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nl_jax.memory import ops  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("structure", "mlp", "memory structure: mlp or linear")
flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 4, "memory heads")
flags.DEFINE_integer("dim", 128, "key/value dimension per head")
flags.DEFINE_integer("hidden", 128, "hidden width of the MLP memory")
flags.DEFINE_integer("chunk", 64, "chunk size (both forms use the same chunk semantics)")
flags.DEFINE_enum("read", "boundary", ["boundary", "per_token", "post_update"], "read mode")
flags.DEFINE_bool("remat", False, "chunked form recomputes each chunk in the backward pass (remat_chunks)")
flags.DEFINE_integer("reps", 3, "timed repetitions per form and length")


def _inputs(length):
    spec = ops.MemorySpec(FLAGS.structure, "l2")
    ks = jax.random.split(jax.random.key(0), 8)
    shape = (FLAGS.batch, length, FLAGS.heads, FLAGS.dim)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], shape)), unit(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], shape)
    gate = lambda key: jax.nn.sigmoid(jax.random.normal(key, shape[:3]))  # noqa: E731
    rates = ops.Rates(
        lr=0.1 * gate(ks[3]), retention=0.9 + 0.1 * gate(ks[4]), momentum=gate(ks[5]), dgd=0.1 * gate(ks[6])
    )
    weights = ops.init_weights(spec, ks[7], (FLAGS.batch, FLAGS.heads), FLAGS.dim, hidden=FLAGS.hidden)
    return spec, ops.init_state(weights, momentum=True), (q, k, v, rates)


def _fwd_bwd(form, spec):
    def loss(weights, state, xs):
        state = state._replace(weights=weights, boundary=weights)
        if form == "naive":
            y, _ = ops.memory_naive(spec, state, *xs, chunk_size=FLAGS.chunk, read=FLAGS.read)
        else:
            y, _ = ops.memory_chunked(
                spec, state, *xs, chunk_size=FLAGS.chunk, read=FLAGS.read, remat=FLAGS.remat
            )
        return jnp.mean(y**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))


def _time(f, *args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def main(_):
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; memory={FLAGS.structure} batch={FLAGS.batch} "
        f"heads={FLAGS.heads} dim={FLAGS.dim} hidden={FLAGS.hidden} chunk={FLAGS.chunk} read={FLAGS.read} remat={FLAGS.remat}; "
        "forward+backward"
    )
    print(f"{'length':>7} {'naive ms':>10} {'chunked ms':>11} {'speed-up':>9}")
    for length in map(int, FLAGS.lengths):
        spec, state, xs = _inputs(length)
        fns = {form: _fwd_bwd(form, spec) for form in ("naive", "chunked")}
        for f in fns.values():  # compile
            _time(f, state.weights, state, xs)
        times = {form: [] for form in fns}
        for _ in range(FLAGS.reps):
            for form, f in fns.items():
                # Untimed call first: the naive form's gigabytes of per-token residuals leave the
                # allocator cold (page faults), which would otherwise be charged to the next call.
                _time(f, state.weights, state, xs)
                times[form].append(_time(f, state.weights, state, xs))
        naive, chunked = (1e3 * float(np.median(times[f])) for f in ("naive", "chunked"))
        print(f"{length:>7} {naive:>10.1f} {chunked:>11.1f} {naive / chunked:>8.1f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
