"""Where a model's training gradient spends its time: one jitted value-and-grad step, traced.

    python -m benchmarks.step_profile --config=hope_tiny
    python -m benchmarks.step_profile --config=hope_tiny --override=model.cms.signal=none --top=20

Times the step (the best of `--repeats` after compilation), traces one more with jax.profiler and
prints, from the trace's XLA CPU kernels: how many ran, their summed time, that time by kind (dot
and library-fused matmuls, dynamic slices and updates (scan inputs, outputs and saved residuals),
copies and transposes, broadcasts, other elementwise fusions) and by pass (the forward, which for
HOPE's ntp signal holds every segment's inner backward, against the outer backward), by part of
the model and pass (the named scopes of `nl_jax.metrics.profiler.PARTS`: HOPE's mixer, its small
and output memories, CMS, inner backward and CMS updates, a Transformer's mixer and MLP; "other" is
the rest: embedding, logits, loss, the loops' plumbing; "no op name": kernels XLA made without one,
the copies it inserts and the dots it rewrites), and the `--top` kernels with their output shape
and HLO op. Kernel times are summed over the runtime's threads, so they can exceed the step's wall
time. It also prints the host's page faults and kernel (system) time per timed step, with the malloc
tunables it ran under (experiments/host_memory.py; NL_JAX_HUGE_PAGES=0 runs it without them). And
the runtime's cost per kernel, timed in the same process on a chain of dependent kernels too small
to do any work (batched 4 x 4 matmuls and tanh): the floor that the step's kernel count puts under
its time, whatever each kernel computes. And what the kernels write: the bytes of their results
(a dynamic-update-slice, which writes into its buffer in place, counts one slice: the buffer over
its leading dimension, a scan's stacking axis), by kind, and against the host's bandwidth, timed
in the same process on a jitted scale of a 256 MiB array: a step that writes at a good part of that
rate is bound by memory traffic rather than by its FLOPs or its kernel count.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import resource
import tempfile
import time

from absl import app, flags

from benchmarks.config_overrides import apply_overrides, parse_overrides
from experiments import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "hope_tiny", "config name (experiments/configs)")
flags.DEFINE_multi_string("override", [], "model config overrides, e.g. model.memory.chunk_size=8")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
flags.DEFINE_integer("repeats", 4, "timed steps after the first")
flags.DEFINE_integer("top", 12, "kernels to list")


def _kind(name: str) -> str:
    if name.startswith(("ynn", "xnn", "dot", "onednn")):
        return "matmul"
    if "dynamic" in name:
        return "dynamic slice / update"
    if "copy" in name or "transpose" in name:
        return "copy / transpose"
    if name.startswith("wrapped_broadcast"):
        return "broadcast"
    return "elementwise and other"


_CONTAINERS = ("while", "conditional", "call")  # their events span the kernels they run


def _kernels(trace_dir: str, instructions: set[str]) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every kernel of the compiled program the trace recorded: the
    events named after one of its HLO `instructions`, on whichever thread ran them (the runtime's
    worker threads, or the client's own thread, which runs a small program's kernels), leaving out
    the loops and calls whose events span their bodies' kernels."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [
        (e["name"], float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and e["name"] in instructions and not e["name"].startswith(_CONTAINERS)
    ]


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4}
_DTYPE_BYTES |= {"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def written_bytes(name: str, shape: str) -> int:
    """Bytes kernel `name` writes, from its HLO result `shape` ("f32[8,16]{1,0}", or a tuple
    "(f32[2]{0}, s32[])"): the whole result, but for an in-place dynamic-update-slice one slice of
    its buffer (the buffer over its leading dimension)."""
    arrays = re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape)
    sizes = [(_DTYPE_BYTES.get(t, 0), [int(d) for d in dims.split(",") if d]) for t, dims in arrays]
    if "dynamic-update-slice" in name and len(sizes) == 1 and sizes[0][1]:
        width, dims = sizes[0]
        return width * math.prod(dims[1:])
    return sum(width * math.prod(dims) for width, dims in sizes)


def _best_seconds(jax, compiled, *args, runs: int = 5) -> float:
    """The fastest of `runs` calls of `compiled`, after one untimed call."""
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def write_bandwidth_gbs(jax, jnp, mib: int = 256) -> float:
    """GB/s written by a jitted scale of a `mib` MiB float32 array (it reads as much), the best of 5."""
    x = jnp.ones((mib * 2**18,), jnp.float32)
    compiled = jax.jit(lambda a: a * 1.5).lower(x).compile()
    return x.nbytes / _best_seconds(jax, compiled, x) / 1e9


def kernel_floor_us(jax, jnp, links: int = 500) -> float:
    """Microseconds per kernel of a jitted loop over `links` dependent (batched 4 x 4 matmul, tanh)
    steps: what the runtime spends on a kernel with next to nothing to compute. The kernels are
    counted in a trace of the program, as the step's are."""

    def chain(x):
        def body(_, x):
            for _ in range(links // 10):
                x = jnp.tanh(jnp.einsum("bij,bjk->bik", x, x) + 0.1)
            return x

        return jax.lax.fori_loop(0, 10, body, x)

    x = jnp.full((8, 4, 4), 0.01)
    compiled = jax.jit(chain).lower(x).compile()
    best = _best_seconds(jax, compiled, x)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(compiled(x))
        jax.profiler.stop_trace()
        n = len(_kernels(trace_dir, set(re.findall(r"%([\w.\-]+) = ", compiled.as_text()))))
    return best / n * 1e6


def main(argv):
    del argv
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from flax import nnx  # noqa: PLC0415

    from experiments import configs  # noqa: PLC0415
    from nl_jax.metrics.profiler import in_outer_backward, part_of  # noqa: PLC0415
    from nl_jax.models import build_model  # noqa: PLC0415
    from nl_jax.train.state import ModelFn  # noqa: PLC0415
    from nl_jax.train.step import make_loss_fn  # noqa: PLC0415

    config = apply_overrides(configs.load(FLAGS.config), parse_overrides(FLAGS.override))
    model = ModelFn.from_config(config.model)
    params = nnx.state(build_model(config.model, nnx.Rngs(0)), nnx.Param).to_pure_dict()
    tokens = jax.random.randint(
        jax.random.PRNGKey(1), (FLAGS.batch, FLAGS.seq_len + 1), 0, config.model.vocab_size, jnp.int32
    )
    batch = {"tokens": tokens}
    step = jax.jit(jax.value_and_grad(make_loss_fn(model)))
    t0 = time.perf_counter()
    compiled = step.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, batch))
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    best = min(times)
    hlo = compiled.as_text()
    ops = dict(re.findall(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo))
    results = dict(re.findall(r"%([\w.\-]+) = (\([^()]*\)|\S+) ", hlo))
    shapes = {name: re.sub(r"\{[^}]*\}", "", shape) for name, shape in results.items()}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(compiled(params, batch))
        jax.profiler.stop_trace()
        kernels = _kernels(trace_dir, set(re.findall(r"%([\w.\-]+) = ", hlo)))

    tokens_per_step = FLAGS.batch * FLAGS.seq_len
    print(
        f"{' '.join([FLAGS.config, *FLAGS.override])}: {FLAGS.batch} x {FLAGS.seq_len}, "
        f"compile {compile_s:.1f} s, step {best * 1e3:.0f} ms ({tokens_per_step / best:,.0f} tokens/s)"
    )
    total = sum(d for _, d in kernels)
    print(f"{len(kernels):,} kernels, {total / 1e3:,.0f} ms summed over threads")
    floor_us = kernel_floor_us(jax, jnp)
    floor_ms = len(kernels) * floor_us / 1e3
    print(
        f"kernel floor: {floor_us:.1f} us per kernel (a chain of tiny ones), {floor_ms:,.0f} ms for this "
        f"step's kernels one after another ({100 * floor_ms / (best * 1e3):.0f}% of the step)"
    )
    faults, system = (after.ru_minflt - usage.ru_minflt, after.ru_stime - usage.ru_stime)
    print(
        f"host: {faults / FLAGS.repeats:,.0f} page faults and {1e3 * system / FLAGS.repeats:,.0f} ms of "
        f"kernel time per step (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or 'unset'})"
    )
    by_kind, by_pass = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    per_name, calls = collections.Counter(), collections.Counter()
    by_part, part_counts = collections.Counter(), collections.Counter()
    written, part_written = collections.Counter(), collections.Counter()
    for name, d in kernels:
        kind = _kind(name)
        by_kind[kind] += d
        counts[kind] += 1
        nbytes = written_bytes(name, results.get(name, ""))
        written[kind] += nbytes
        outer = in_outer_backward(ops.get(name, ""))
        by_pass["outer backward" if outer else "forward (with any inner backward)"] += d
        key = (part_of(ops[name]) if name in ops else "no op name", outer)
        by_part[key] += d
        part_counts[key] += 1
        part_written[key] += nbytes
        per_name[name] += d
        calls[name] += 1
    total_written = sum(written.values())
    print(
        f"written: {total_written / 1e6:,.1f} MB by the step's kernels, {total_written / 1e9 / best:,.2f} GB/s "
        f"over the step; the host writes {write_bandwidth_gbs(jax, jnp):,.1f} GB/s (a jitted scale of 256 MiB)"
    )
    for title, table in (("by kind", by_kind), ("by pass", by_pass)):
        print(f"\n{title}:")
        for key, d in table.most_common():
            n = ""
            if title == "by kind":
                n = f"{counts[key]:>9,} kernels {written[key] / 1e6:9,.1f} MB written"
            print(f"  {key:36s} {d / 1e3:9.1f} ms {100 * d / total:5.1f}% {n}")
    print("\nby part (forward with any inner backward | outer backward):")
    for p in sorted({p for p, _ in by_part}, key=lambda p: -(by_part[p, False] + by_part[p, True])):
        cells = [(by_part[p, o], part_counts[p, o], part_written[p, o] / 1e6) for o in (False, True)]
        cells = [
            f"{d / 1e3:9.1f} ms {100 * d / total:5.1f}% {n:>8,} kernels {mb:7,.1f} MB" for d, n, mb in cells
        ]
        print(f"  {p:16s} {cells[0]} | {cells[1]}")
    print(f"\ntop {FLAGS.top} kernels (ms per step, calls):")
    for name, d in per_name.most_common(FLAGS.top):
        shape, op = shapes.get(name, ""), ops.get(name, "")[-60:]
        print(f"  {d / 1e3:8.1f} ms {calls[name]:6d}  {name:30s} {shape:22s} {op}")


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as the experiments commands run
    app.run(main)
