"""The one logical-axis rules table, and what turns a model's logical names into shardings.

Parameters name their dimensions ('vocab', 'embed', 'mlp', 'heads', ...) in `out_sharding`
metadata; this table alone decides which mesh axes those names map to. Typical start-up:

    abstract = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    print(sharding_table(nnx.state(abstract), mesh))
    model = init_sharded(lambda: build_model(cfg.model, nnx.Rngs(0)), mesh)  # born sharded
"""

from collections.abc import Callable, Sequence
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical name -> mesh axis, tuple of mesh axes, or None (replicated). FSDP shards weights along
# 'embed'; tensor parallelism splits the wide dimensions (mlp, heads, vocab); stacked layers stay whole
# on every device because the scan slices them one at a time. A mesh axis serves one dimension of an
# array (the first that names it and that it divides), so later names act as fallbacks: head_dim takes
# 'tensor' when the heads do not split over it, memory_in takes 'fsdp' when memory_out does not, and
# 'fsdp' goes to the heads only where no earlier dimension (embed) took it. Small parameters (norm
# scales, memory inits) are sharded too: on a 32-way fsdp axis a replicated 2% of the weights is 60%
# more weight memory per device.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_embed", None),  # the residual stream is replicated over fsdp/tensor
    ("activation_heads", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", ("tensor", "fsdp")),  # fsdp: conv kernels over the heads' channels, (heads, ...) memories
    ("kv_heads", "tensor"),
    ("head_dim", "tensor"),  # only where the (kv) heads did not take 'tensor'
    ("norm", "fsdp"),  # norm scales and biases: all-gathered when used, like every FSDP weight
    ("conv_width", None),
    ("lora", "fsdp"),  # LoRA widths (RWKV-7): FSDP where the other axes leave it free (up-projections)
    ("layers", None),
    # associative memories (meta-learned initial fast weights, CMS levels)
    ("memory_out", "fsdp"),
    ("memory_in", "fsdp"),
    ("levels", None),
)


def _mesh_axes(name, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    table = dict(rules)
    if name not in table:
        raise ValueError(
            f"logical axis {name!r} has no rule; add it to nl_jax/parallel/rules.py (known: {sorted(table)})"
        )
    axes = table[name]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> P:
    """PartitionSpec for one array. A mesh axis is used at most once (first dimension wins), and
    with `shape` and `mesh` given, axes that do not divide a dimension are dropped (replicated)
    instead of failing: e.g. 4 kv heads on an 8-way tensor axis."""
    used, spec = set(), []
    for i, name in enumerate(names):
        axes = [a for a in _mesh_axes(name, rules) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape]  # a rules axis the mesh lacks is replicated
            if shape is not None:
                kept = []
                for a in axes:
                    if shape[i] % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _var_spec(var, mesh, rules) -> P:
    names = var.get_metadata().get("out_sharding")
    if not names:
        return P()
    return logical_to_spec(names, var.shape, mesh, rules)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings with the structure of an (abstract) nnx State: each Variable's value is
    replaced by its NamedSharding, so the result can be passed as jit in/out_shardings."""
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, _var_spec(v, mesh, rules))), state, is_leaf=_is_var
    )


def init_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Builds the module with every array created directly in its sharded layout (no host copy
    of the full model): eval_shape -> shardings -> jit(init, out_shardings)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """with_sharding_constraint by logical names under the mesh set with `jax.set_mesh`; a no-op
    without one, so the same model code runs on a laptop."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def batch_and_head_axes(batch: int, heads: int, mesh) -> tuple:
    """The mesh axes that split a [batch, ..., heads, ...] array by the 'batch' and 'heads' rules
    (None for a dimension left whole): the PartitionSpec entries for a kernel under `shard_map`,
    which sees each device's block of sequences and heads."""
    spec = tuple(logical_to_spec(("batch", "heads"), (batch, heads), mesh)) + (None, None)
    return spec[0], spec[1]


def constrain_batch(tree, axis: int = 0, rules=LOGICAL_AXIS_RULES):
    """Every array of `tree` with dimension `axis` sharded by the 'batch' rule and its other
    dimensions left to XLA; a no-op without a mesh. For per-sequence states built from parameters
    (meta-learned initial fast weights broadcast over the batch): without it the parameters' layout
    can propagate into the state instead of the batch's."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree

    def one(x):
        if x.ndim <= axis:
            return x
        names = [None] * x.ndim
        names[axis] = "batch"
        entries = list(logical_to_spec(names, x.shape, mesh, rules)) + [None] * x.ndim
        spec = P(*(entries[i] if i == axis else P.UNCONSTRAINED for i in range(x.ndim)))
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(one, tree)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def sharding_table(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> str:
    """One line per Variable: path, shape, logical names, PartitionSpec (for the startup banner)."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    rows = [
        (
            _path_str(p),
            str(tuple(v.shape)),
            str(v.get_metadata().get("out_sharding") or "-"),
            str(_var_spec(v, mesh, rules)),
        )
        for p, v in leaves
        if _is_var(v)
    ]
    widths = [max(len(r[i]) for r in rows + [("path", "shape", "logical", "spec")]) for i in range(3)]
    lines = [f"{'path':<{widths[0]}}  {'shape':<{widths[1]}}  {'logical':<{widths[2]}}  spec"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    total = sum(math.prod(v.shape) for _, v in leaves if isinstance(v, nnx.Param))
    mesh_desc = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"mesh ({mesh_desc}), {total:,} parameters\n" + "\n".join(lines)


def assert_params_sufficiently_sharded(
    state, mesh: Mesh, tolerance: float = 0.02, rules=LOGICAL_AXIS_RULES
) -> float:
    """Fails if too much of the weight memory is replicated over the weight-sharding axes.

    `state`: a Module or an (abstract) State; only nnx.Param leaves count.

    Mirrors MaxText's check: with every non-'data' axis used for weights, one device would ideally
    hold total/n of the parameters; the excess fraction it actually holds must stay <= tolerance.
    Returns that fraction.
    """
    n = math.prod(s for a, s in mesh.shape.items() if a != "data")
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    leaves = [v for v in jax.tree.leaves(state, is_leaf=_is_var) if isinstance(v, nnx.Param)]
    total = per_device = 0
    for v in leaves:
        spec = _var_spec(v, mesh, rules)
        shards = math.prod(
            mesh.shape[a] for e in spec if e for a in ((e,) if isinstance(e, str) else e) if a != "data"
        )
        size = math.prod(v.shape)
        total += size
        per_device += size / shards
    if not total:
        raise ValueError("no nnx.Param found in the state given to assert_params_sufficiently_sharded")
    excess = per_device / (total / n) - 1.0
    if excess > tolerance:
        raise AssertionError(
            f"each device holds {per_device:,.0f} of {total:,} parameters, "
            f"{excess:.1%} more than a full {n}-way split "
            f"(tolerance {tolerance:.1%}); see the sharding table"
        )
    return excess
