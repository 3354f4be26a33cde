"""Ahead-of-time compilation of the train step for a TPU slice, and what the executable says.

`compile_for_slice(config, "v5p-64")` builds the exact jitted step that `experiments.pretrain`
runs (same model, optimizer, mesh from config.mesh, shardings, donation: `build_train_program`)
over abstract TPU devices (libtpu on any host) and compiles it. From the executable it reads the
per-device memory, XLA's FLOP count, and from the optimized HLO what the step executes (`profile_hlo`:
kernel ops and collectives with every loop body counted as often as its loop runs); next to them
it puts the analytic model FLOPs and the projected step time of `nl_jax.train.projection`, with the
op count and collectives of the compiled program.

XLA's `cost_analysis` counts the body of a `lax.scan` once (layers, chunks, microbatches), so its
FLOPs are reported as they are, beside the analytic count, and not used for the projection.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import re
import time

import jax

from nl_jax import metrics as metrics_lib
from nl_jax.parallel.mesh import make_mesh
from nl_jax.parallel.rules import assert_params_sufficiently_sharded
from nl_jax.parallel.topology import GiB, Slice, parse_slice, topology_devices
from nl_jax.train import projection as projection_lib
from nl_jax.train.loop import check_config
from nl_jax.train.program import build_train_program

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class AotReport:
    """Per-device figures of the compiled train step on one slice."""

    slice: Slice
    mesh_shape: dict
    param_count: int
    tokens_per_step: int
    argument_bytes: int  # per device, from compiled.memory_analysis()
    output_bytes: int
    alias_bytes: int  # outputs that reuse a donated input's buffer
    temp_bytes: int
    code_bytes: int
    xla_flops_per_device: float  # cost_analysis: a scan body counted once
    model_flops_per_device: float  # 3 x analytic forward FLOPs per token x tokens / devices
    flops_source: str
    recompute_flops_per_device: float  # forward FLOPs recomputed in the backward (remat), analytic
    remat: str  # the remat settings, e.g. "full" or "dots_saveable, ntp checkpoint every 16 segments"
    grad_accum_steps: int
    collectives: dict | None  # op -> count in the optimized HLO; None when the HLO text is unavailable
    compile_seconds: float
    weight_excess: float  # parameters per device over a perfect split across the non-data axes (0.1 = 10%)
    projection: projection_lib.Projection | None = None  # with the compiled op count when there is one
    compiled: object = dataclasses.field(repr=False, default=None)  # None when XLA ran out of HBM
    oom_message: str = ""  # XLA's RESOURCE_EXHAUSTED message; the memory figures are then estimates

    @property
    def total_bytes(self) -> int:
        """HBM per device: inputs + temporaries + outputs that do not reuse an input + code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.oom_message and self.total_bytes <= self.slice.chip.hbm_bytes

    @property
    def sequences_that_fit(self) -> int | None:
        """Sequences per device per microbatch that HBM holds, if every temporary grows with them
        (an upper bound on what one sequence needs); None without a compiled step."""
        if self.oom_message or not self.temp_bytes or self.projection is None:
            return None
        used = self.projection.workload.sequences
        room = self.slice.chip.hbm_bytes - (self.total_bytes - self.temp_bytes)
        return max(0, int(room * used // self.temp_bytes))

    def format(self, baseline: tuple[str, projection_lib.Projection] | None = None) -> str:
        """The report, then the projection (next to `baseline`: a name and its projection)."""
        chip = self.slice.chip

        def gib(b):
            return f"{b / GiB:8.2f} GiB"

        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        source = (
            "compiled" if not self.oom_message else "XLA ran out of HBM; arguments from the shard shapes, "
        )
        source += "" if not self.oom_message else "temporaries from its message"
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if self.oom_message:
            coll = "unavailable (not compiled)"
        elif self.collectives is None:
            coll = "unavailable (this libtpu cannot print the optimized HLO)"
        else:
            coll = ", ".join(f"{c} {n}" for n, c in self.collectives.items() if c) or "none"
        xla = "n/a" if self.oom_message else f"{self.xla_flops_per_device:.3e} (counts a scan body once)"
        multi = f", {self.slice.num_slices} slices" if self.slice.num_slices > 1 else ""
        lines = [
            f"slice           {self.slice.name} ({self.slice.num_devices} x {chip.name}, "
            f"{self.slice.topology_name}{multi})",
            f"mesh            {mesh}",
            f"remat           {self.remat}; {self.grad_accum_steps} microbatch(es) per step",
            f"parameters      {self.param_count:,}",
            f"weights         {100 * self.weight_excess:.1f}% per device over a perfect split "
            "(replicated parameters)",
            f"tokens / step   {self.tokens_per_step:,}",
            f"compile time    {self.compile_seconds:.1f} s (lower + compile)",
            f"memory per device ({source})",
            f"  arguments     {gib(self.argument_bytes)}  (train state + batch shard)",
            f"  outputs       {gib(self.output_bytes)}  ({gib(self.alias_bytes).strip()} reuse donated inputs)",
            f"  temporaries   {gib(self.temp_bytes)}",
            f"  code          {gib(self.code_bytes)}",
            f"  total         {gib(self.total_bytes)}  of {chip.hbm_bytes / GiB:.0f} GiB HBM "
            f"({100 * self.total_bytes / chip.hbm_bytes:.0f}%): {verdict}",
            f"FLOPs / device  model {self.model_flops_per_device:.3e} per step ({self.flops_source}, x3 for "
            f"the train step); XLA {xla}",
            f"collectives     {coll}",
            *([f"XLA             {self.oom_message}"] if self.oom_message else []),
            f"recompute       {self.recompute_flops_per_device:.3e} FLOPs / device / step (rematerialisation)",
        ]
        fit = self.sequences_that_fit
        if fit is not None:
            lines.append(
                f"sequences       {fit} per device per microbatch fit by the compiled temporaries "
                f"({self.temp_bytes / GiB:.1f} GiB for {self.projection.workload.sequences})"
            )
        if self.projection is not None:
            lines += projection_lib.describe(self.projection, baseline)
        return "\n".join(lines)

    def markdown_row(self, config_name: str, baseline: projection_lib.Projection | None = None) -> str:
        """One row of MARKDOWN_HEADER's table; `baseline`: the Transformer++ of the same size."""
        mesh = " x ".join(f"{k}{v}" for k, v in self.mesh_shape.items() if v > 1) or "1 device"
        xla = "n/a" if self.oom_message else f"{self.xla_flops_per_device:.2e}"
        p = self.projection
        cells = [
            config_name,
            f"{self.param_count / 1e6:,.0f}M",
            mesh,
            self.remat,
            str(self.grad_accum_steps),
            f"{self.total_bytes / GiB:.1f}",
            "yes" if self.fits else "**no**",
            f"{xla} / {self.model_flops_per_device:.2e}",
            f"{p.step_seconds:,.2f} s" if p else "n/a",
            f"{p.tokens_per_second:,.0f}" if p else "n/a",
            f"{p.tokens_per_second / baseline.tokens_per_second:.1%}" if p and baseline else "n/a",
        ]
        return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = (
    "| config | params | mesh | remat | accum | GiB / device | fits | FLOPs / device: XLA / model "
    "| projected step | tokens/s | of Transformer++ |\n|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|"
)


def recompute_flops_per_token(model_cls, model_cfg, seq_len: int, forward: float) -> tuple[float, str]:
    """(forward FLOPs per token recomputed in the backward, the remat settings in words)."""
    policy = str(model_cfg.get("remat_policy", "none"))
    remat = policy
    segments = getattr(model_cls, "ntp_segments_per_checkpoint", lambda *_: 1)(model_cfg, seq_len)
    if segments > 1:
        remat += f", ntp checkpoint every {segments} segments"
    own = getattr(model_cls, "recompute_flops_per_token", None)
    if own is not None:
        return float(own(model_cfg, seq_len)), remat
    return (float(forward) if policy in ("full", "nothing_saveable") else 0.0), remat


def count_collectives(hlo_text: str) -> dict:
    """Occurrences of each collective op in optimized HLO text (an async start/done pair counts once)."""
    counts = collections.Counter()
    for name in COLLECTIVES:
        counts[name] = len(re.findall(rf"\s{name}(?:-start)?\(", hlo_text))
    return dict(counts)


_FREE_OPS = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "copy-start",  # an asynchronous DMA between HBM and VMEM, issued beside the kernels
}  # no kernel runs for these
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")


@dataclasses.dataclass(frozen=True)
class HloCollective:
    """One collective of the optimized HLO: its group size, bytes moved per device, and how many
    times a step runs it (the trip counts of the loops around it multiplied)."""

    op: str
    group: int
    bytes: float
    runs: float


@dataclasses.dataclass(frozen=True)
class HloProfile:
    """What a step executes, from the optimized HLO: kernel ops and collectives, every loop body
    counted as many times as its loop runs (trip counts from the loop conditions)."""

    ops: float  # executed kernel ops per step
    collectives: tuple  # HloCollective
    loops: tuple  # (trip count, runs per step, kernel ops per iteration with the loops inside)


def _computations(text: str) -> tuple[dict, str]:
    comps, current, entry = {}, None, ""
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            m = _INSTRUCTION.match(line)
            if m:
                comps[current].append((m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _largest_array_bytes(shape: str) -> int:
    sizes = [
        _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)
    ]
    return max(sizes, default=0)


def _group_size(rest: str) -> int:
    if "source_target_pairs" in rest:
        return 2
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", rest)  # mesh[axis=size, ...] {axes}
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)  # iota form: [groups,size]<=[devices]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    return len(m.group(1).split(",")) if m and m.group(1) else 1


def _moved_bytes(op: str, result: int, group: int) -> float:
    """Bytes a device sends for a collective whose result has `result` bytes (ring algorithms)."""
    share = (group - 1) / group if group > 1 else 0.0
    return {
        "all-gather": result * share,
        "all-reduce": 2 * result * share,
        "reduce-scatter": result * (group - 1),
        "all-to-all": result * share,
    }.get(op, float(result))


def _trip_count(comps: dict, cond: str, rest: str) -> int:
    m = re.search(r"known_trip_count[^0-9]*(\d+)", rest)
    if m:
        return int(m.group(1))
    consts = [
        int(c)
        for shape, op, args in comps.get(cond, ())
        if op == "constant" and shape.startswith("s32[]")
        for c in re.findall(r"^(\d+)\)", args)
    ]
    return max(consts, default=1)


def profile_hlo(text: str) -> HloProfile:
    """Kernel ops and collectives of optimized HLO text, loops unrolled by their trip counts.

    Kernels are the instructions of the entry, loop, call and branch computations (a fusion is one;
    its fused body is not entered); a conditional counts its largest branch; an async pair counts
    once. Trip counts: the loop's known_trip_count, else the constant its condition compares with."""
    comps, entry = _computations(text)
    loops = []

    def walk(name: str, runs: float) -> tuple[float, list]:
        ops, collectives = 0.0, []
        for shape, op, rest in comps.get(name, ()):
            called = lambda key, rest=rest: re.search(key + r"=%([\w.\-]+)", rest).group(1)  # noqa: E731
            if op == "while":
                cond = called("condition")
                trip = _trip_count(comps, cond, rest)
                body, inside = walk(called("body"), runs * trip)
                body += walk(cond, 0.0)[0]  # the condition's compare runs every iteration
                loops.append((trip, runs * trip, body))
                ops, collectives = ops + trip * body, collectives + inside
            elif op == "call":
                inner, inside = walk(called("to_apply"), runs)
                ops, collectives = ops + inner, collectives + inside
            elif op == "conditional":
                names = re.findall(r"%([\w.\-]+)", rest.split("branch_computations=")[-1].split("}")[0])
                names = names or [called(k) for k in ("true_computation", "false_computation")]
                inner, inside = max((walk(b, runs) for b in names), key=lambda branch: branch[0])
                ops, collectives = ops + inner, collectives + inside
            elif not (
                op.endswith("-done")
                or op.endswith("-update")
                or op in _FREE_OPS
                or '"AllocateBuffer"' in rest
            ):
                ops += 1
                # libtpu wraps an asynchronous collective in a fusion (its start), one kernel.
                inner = comps.get(called("calls"), ()) if op == "fusion" else [(shape, op, rest)]
                for inner_shape, inner_op, inner_rest in inner:
                    base = inner_op.removesuffix("-start")
                    if base in COLLECTIVES:
                        group = _group_size(inner_rest)
                        moved = _moved_bytes(base, _largest_array_bytes(inner_shape), group)
                        collectives.append(HloCollective(base, group, moved, runs))
        return ops, collectives

    total, collectives = walk(entry, 1.0)
    return HloProfile(total, tuple(collectives), tuple(loops))


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (no layout padding)."""
    return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))


def _bytes_in_message(message: str) -> int:
    """The size XLA names in an out-of-memory message ('... HLO temporaries (1.26T) exceeds ...')."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    if not m:
        return 0
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def mesh_for_slice(mesh_cfg, slice_: Slice):
    """The mesh of config.mesh over the slice's abstract devices; ValueError naming both if they differ."""
    devices = topology_devices(slice_)
    try:
        return make_mesh(mesh_cfg, devices)
    except ValueError as e:
        raise ValueError(
            f"config.mesh does not match slice {slice_.name} ({slice_.num_devices} devices"
            f"{f' in {slice_.num_slices} slices' if slice_.num_slices > 1 else ''}): {e}"
        ) from e


def compile_for_slice(config, slice_name: str, *, save_path: str | None = None) -> AotReport:
    """Compiles the train step of `config` for the TPU slice `slice_name` (e.g. "v5p-64") on this host.

    `save_path`: also write the serialized executable there (pickle of
    jax.experimental.serialize_executable.serialize's (payload, in_tree, out_tree))."""
    check_config(config)
    slice_ = parse_slice(slice_name)
    mesh = mesh_for_slice(config.mesh, slice_)
    gbs, seq_len = int(config.data.global_batch_size), int(config.data.seq_len)
    program = build_train_program(config, mesh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = program.jit_train.lower(program.abstract_state, program.abstract_batch)
        try:
            compiled, oom = lowered.compile(), ""
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, oom = None, str(e).strip().splitlines()[0]
    seconds = time.perf_counter() - t0

    if compiled is not None:
        mem = compiled.memory_analysis()
        memory = dict(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            code_bytes=int(mem.generated_code_size_in_bytes),
        )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
        xla_flops = float(cost.get("flops", 0.0))
        try:
            text = compiled.as_text()
        except Exception:  # newer libtpu fail to print some async ops (RET_CHECK in hlo_instruction.cc)
            text = None
        collectives = count_collectives(text) if text else None
    else:
        state = _shard_bytes(program.abstract_state)
        memory = dict(
            argument_bytes=state + _shard_bytes(program.abstract_batch),
            output_bytes=state,
            alias_bytes=state,
            temp_bytes=_bytes_in_message(oom),
            code_bytes=0,
        )
        xla_flops, collectives, text = float("nan"), None, None

    model = program.model
    param_count = model.param_count()
    excess = assert_params_sufficiently_sharded(model.template, mesh, tolerance=math.inf)
    fwd, _ = metrics_lib.forward_flops_per_token(model.cls, config.model, seq_len, param_count)
    train, source = metrics_lib.train_flops_per_token(model.cls, config.model, seq_len, param_count)
    tokens = gbs * seq_len
    model_flops = train * tokens / slice_.num_devices
    recompute, remat = recompute_flops_per_token(model.cls, config.model, seq_len, fwd)
    work = projection_lib.workload(config, slice_, model.cls, param_count)
    if text:
        work = projection_lib.with_compiled(work, profile_hlo(text))

    if save_path and compiled is not None:  # nothing to save when XLA ran out of HBM
        from jax.experimental.serialize_executable import serialize

        with open(save_path, "wb") as f:
            pickle.dump(serialize(compiled), f)

    return AotReport(
        slice=slice_,
        mesh_shape=dict(mesh.shape),
        param_count=param_count,
        tokens_per_step=tokens,
        **memory,
        xla_flops_per_device=xla_flops,
        model_flops_per_device=model_flops,
        flops_source=source,
        recompute_flops_per_device=recompute * tokens / slice_.num_devices,
        remat=remat,
        grad_accum_steps=int(config.train.grad_accum_steps),
        collectives=collectives,
        compile_seconds=seconds,
        weight_excess=excess,
        projection=projection_lib.project(work, slice_),
        compiled=compiled,
        oom_message=oom,
    )
