"""Logical-axis rules: specs, divisibility fallback, golden shardings, sharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.configs import base, transformer_tiny
from nl_jax.models import build_model
from nl_jax.parallel import (
    LOGICAL_AXIS_RULES,
    assert_params_sufficiently_sharded,
    constrain,
    constrain_batch,
    init_sharded,
    logical_to_spec,
    make_mesh,
    sharding_table,
    state_shardings,
)


def _mesh(data=1, fsdp=2, tensor=4):
    cfg = base.get_config().mesh
    cfg.update(ici_data_parallelism=data, ici_fsdp_parallelism=fsdp, ici_tensor_parallelism=tensor)
    return make_mesh(cfg)


def _model_cfg():
    cfg = transformer_tiny.get_config().model
    cfg.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=128)
    return cfg


def test_logical_to_spec():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "activation_embed")) == P(("data", "fsdp"))
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor")
    mesh = _mesh()
    # 2 kv heads cannot split 4 ways: head_dim takes 'tensor' instead (no error, no replication).
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, "tensor")
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 6), mesh) == P("fsdp")
    # memory inits (heads, memory_out, memory_in): 'fsdp' on the first memory dimension it divides.
    names = ("heads", "memory_out", "memory_in")
    assert logical_to_spec(names, (4, 8, 8), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(names, (4, 3, 8), mesh) == P("tensor", None, "fsdp")
    # A mesh axis is used once per array: the second 'tensor' dimension takes only 'fsdp'.
    assert logical_to_spec(("mlp", "heads"), (8, 8), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("conv_width", "heads"), (4, 16), mesh) == P(None, ("tensor", "fsdp"))
    with pytest.raises(ValueError, match="'embedding' has no rule"):
        logical_to_spec(("embedding",))


def test_rules_table_is_small_and_unique():
    names = [n for n, _ in LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names)) and len(names) <= 20


def _flat(state) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    return {"/".join(str(k.key) for k in path): v for path, v in leaves}


GOLDEN = {  # path -> spec under fsdp=2 x tensor=4
    "embed/embedding": P("tensor", "fsdp"),
    "unembed/kernel": P("fsdp", "tensor"),
    "blocks/layers/attn/q/kernel": P(None, "fsdp", "tensor"),
    "blocks/layers/attn/k/kernel": P(None, "fsdp", None, "tensor"),  # 2 kv heads < 4: head_dim
    "blocks/layers/attn/o/kernel": P(None, "tensor", None, "fsdp"),
    "blocks/layers/mlp/down/kernel": P(None, "tensor", "fsdp"),
    "blocks/layers/mlp_norm/scale": P(None, "fsdp"),
    "final_norm/scale": P("fsdp"),
}


def test_golden_shardings_and_sharded_forward():
    mesh = _mesh()
    cfg = _model_cfg()
    make = lambda: build_model(cfg, nnx.Rngs(0))
    abstract = nnx.state(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    model = init_sharded(make, mesh)
    state = nnx.state(model)
    shardings, state = _flat(shardings), _flat(state)
    for path, spec in GOLDEN.items():
        assert shardings[path].get_value().spec == spec, path
        assert state[path][...].sharding.spec == spec, path  # arrays are born in that layout
    table = sharding_table(abstract, mesh)
    assert "blocks/layers/attn/q/kernel" in table and "P(None, 'fsdp', 'tensor')" in table

    ref = build_model(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)
    want = jax.jit(lambda t: ref(t))(tokens)
    with jax.set_mesh(mesh):
        sharded_tokens = jax.device_put(tokens, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        got = nnx.jit(lambda m, t: m(t))(model, sharded_tokens)
    assert got.sharding.spec[0] in ("fsdp", ("data", "fsdp"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_forward_on_data_fsdp_tensor_mesh():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    cfg = _model_cfg()
    model = init_sharded(lambda: build_model(cfg, nnx.Rngs(1)), mesh)
    ref = build_model(cfg, nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size)
    with jax.set_mesh(mesh):
        got = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(got, jax.jit(lambda t: ref(t))(tokens), rtol=1e-5, atol=1e-5)


def test_sufficiently_sharded_check():
    mesh = _mesh()
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(_model_cfg(), nnx.Rngs(0))))
    excess = assert_params_sufficiently_sharded(abstract, mesh, tolerance=0.5)
    assert 0 <= excess < 0.02  # only the norm scales are replicated, over 'tensor'
    replicate_all = tuple((n, None) for n, _ in LOGICAL_AXIS_RULES)
    with pytest.raises(AssertionError, match="more than a full 8-way split"):
        assert_params_sufficiently_sharded(abstract, mesh, tolerance=0.02, rules=replicate_all)


def test_constrain_is_a_noop_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 6))
    assert constrain(x, ("batch", "length", "activation_embed")) is x
    mesh = _mesh()
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: constrain(x * 2, ("batch", "length", "activation_embed")))(x)
    assert y.sharding.spec == P("fsdp")


def test_constrain_batch_shards_the_batch_axis_and_leaves_the_rest():
    tree = {"w": jnp.ones((3, 8, 4, 6)), "pos": jnp.zeros((3,), jnp.int32)}
    assert constrain_batch(tree, axis=1) is tree  # no mesh: a no-op
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    w_spec = P(None, None, "fsdp", "tensor")  # a layout the batch constraint must override
    with jax.set_mesh(mesh):
        w = jax.device_put(tree["w"], jax.NamedSharding(mesh, w_spec))
        out = jax.jit(lambda t: constrain_batch(jax.tree.map(lambda a: a + 1, t), axis=1))(dict(tree, w=w))
    assert out["w"].sharding.spec[1] == ("data", "fsdp"), out["w"].sharding.spec
    assert out["pos"].shape == (3,)
