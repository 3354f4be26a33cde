"""Forward+backward time of the self-modifying Titans layer (chunked) against its token-by-token reference.

    python -m benchmarks.self_modifying                         # lengths 256 and 1024
    python -m benchmarks.self_modifying --lengths=256,1024,4096 --read=per_token

Both compute the same function (same chunk semantics; the reference is a `lax.scan` over tokens
with an inner `jax.grad` per memory). Timings are medians over repetitions that alternate between
the two, so machine noise hits both alike; the speed-up is the ratio measured in this one run.
"""

import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nl_jax.mixers.self_modifying import SelfModifyingTitans  # noqa: E402
from nl_jax.mixers.self_modifying_reference import reference_forward  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["256", "1024"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("d_model", 128, "model width")
flags.DEFINE_integer("heads", 4, "memory heads")
flags.DEFINE_integer("head_dim", 32, "head width")
flags.DEFINE_string("structure", "mlp", "memory structure: mlp or linear")
flags.DEFINE_integer("chunk", 8, "chunk size of the k, v, eta, alpha memories")
flags.DEFINE_integer("memory_chunk", 64, "chunk size of the output memory")
flags.DEFINE_enum("read", "boundary", ["boundary", "per_token"], "output memory read mode")
flags.DEFINE_bool("remat", True, "recompute each chunk in the backward pass (training default)")
flags.DEFINE_integer("reps", 3, "timed repetitions per form and length")


def _fwd_bwd(layer, form):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        model = nnx.merge(graphdef, params, rest)
        y = model(x)[0] if form == "chunked" else reference_forward(model, x)[0]
        return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda x: step(params, x)


def _time(f, x):
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    return time.perf_counter() - t


def main(_):
    layer = SelfModifyingTitans(
        FLAGS.d_model,
        FLAGS.heads,
        FLAGS.head_dim,
        structure=FLAGS.structure,
        chunk_size=FLAGS.chunk,
        memory_chunk_size=FLAGS.memory_chunk,
        read=FLAGS.read,
        remat_chunks=FLAGS.remat,
        rngs=nnx.Rngs(0),
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; self-modifying Titans {FLAGS.structure} "
        f"batch={FLAGS.batch} d_model={FLAGS.d_model} heads={FLAGS.heads} head_dim={FLAGS.head_dim} "
        f"chunks={FLAGS.chunk}/{FLAGS.memory_chunk} read={FLAGS.read} remat={FLAGS.remat}; forward+backward"
    )
    print(
        f"{'length':>7} {'reference ms':>13} {'chunked ms':>11} {'speed-up':>9} {'compile s (ref/chunked)':>24}"
    )
    forms = {"reference": _fwd_bwd(layer, "reference"), "chunked": _fwd_bwd(layer, "chunked")}
    for length in map(int, FLAGS.lengths):
        x = jax.random.normal(jax.random.key(length), (FLAGS.batch, length, FLAGS.d_model))
        compile_s = {name: _time(f, x) for name, f in forms.items()}  # first call: compile + run
        times = {name: [] for name in forms}
        for _ in range(FLAGS.reps):  # alternate, so noise hits both forms alike
            for name, f in forms.items():
                times[name].append(_time(f, x))
        med = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        print(
            f"{length:>7} {med['reference']:>13.1f} {med['chunked']:>11.1f} "
            f"{med['reference'] / med['chunked']:>8.1f}x {compile_s['reference']:>12.1f} / {compile_s['chunked']:.1f}"
        )


if __name__ == "__main__":
    app.run(main)
