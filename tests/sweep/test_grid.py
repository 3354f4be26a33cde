"""Sweep points: typed grid values, product and names, named sweeps, and the command-line round trip."""

import pytest
from absl import flags

from experiments import configs
from nl_jax.optim.factory import OPTIMIZERS
from nl_jax.sweep import grid, make_plan, named


@pytest.fixture(scope="module")
def hope():
    return configs.load("hope_tiny")


@pytest.fixture(scope="module")
def transformer():
    return configs.load("transformer_tiny")


def test_values_take_the_type_of_the_field(hope):
    assert grid.parse_grid_flag(hope, "config.model.memory.dgd=false,True") == (
        "model.memory.dgd",
        [False, True],
    )
    key, values = grid.parse_grid_flag(hope, "optim.lr=1e-3,3e-3")
    assert key == "optim.lr" and values == [1e-3, 3e-3] and all(isinstance(v, float) for v in values)
    assert grid.parse_grid_flag(hope, "train.steps=10,20")[1] == [10, 20]
    assert grid.parse_grid_flag(hope, "model.cms.signal=ntp,local,none")[1] == ["ntp", "local", "none"]
    assert grid.parse_grid_flag(hope, "data.path='a,b',c")[1] == ["a,b", "c"]
    # Brackets group a tuple value; a 1-tuple needs no trailing comma.
    assert grid.parse_grid_flag(hope, "model.cms.periods=(16,64),(8,),(32)")[1] == [(16, 64), (8,), (32,)]
    assert grid.parse_grid_flag(hope, "optim.lr=1")[1] == [1.0]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("optim.lrr=1,2", "no field 'optim.lrr'. Did you mean optim.lr"),
        ("optim=1,2", "is a config section"),
        ("train.steps=1.5", "train.steps='1.5': not a valid int"),
        ("model.memory.dgd=maybe", "not a valid bool"),
        ("optim.lr=1,1.0", "a value is repeated"),
        ("model.cms.periods=(16,64", "unbalanced"),
        ("optim.lr=1,,2", "an empty value"),
        ("optim.lr", "expected KEY=V1,V2"),
    ],
)
def test_bad_grid_flags_name_the_problem(hope, flag, message):
    with pytest.raises((KeyError, ValueError), match=message.replace("(", r"\(").replace(".", r"\.")):
        grid.parse_grid_flag(hope, flag)


def test_product_order_names_and_collisions(transformer):
    axes = grid.grid_axes(transformer, ["config.optim.lr=1e-3,3e-3", "train.seed=0,1"])
    points = grid.product(axes)
    assert [p.name for p in points] == [
        "lr=0.001__seed=0",
        "lr=0.001__seed=1",
        "lr=0.003__seed=0",
        "lr=0.003__seed=1",
    ]
    assert points[1].overrides == (("optim.lr", 1e-3), ("train.seed", 1))
    # Same last component: the names keep enough of the key to tell them apart.
    assert grid.short_keys(["model.name", "optim.name", "train.seed"]) == {
        "model.name": "model.name",
        "optim.name": "optim.name",
        "train.seed": "seed",
    }
    # Values that look the same once path-safe get a hash, so workdirs never collide.
    clash = grid.product([(grid.Option("a/b", (("k", 1),)), grid.Option("a-b", (("k", 2),)))])
    assert clash[0].name != clash[1].name and all(p.name.startswith("a-b__") for p in clash)
    with pytest.raises(ValueError, match="optim.lr is swept by two axes"):
        grid.product(grid.grid_axes(transformer, ["optim.lr=1,2", "optim.lr=3,4"]))


def test_hope_ablation_is_the_paper_table(hope):
    (axis,) = named.named_axes("hope_ablation", hope)
    assert [o.label for o in axis] == [
        "hope",
        "wo_dgd",
        "wo_momentum",
        "wo_weight_decay",
        "wo_cms",
        "wo_adaptive_k",
        "wo_adaptive_v",
        "adaptive_q",
    ]
    for opt in axis:
        for key, value in opt.overrides:
            assert grid.get_field(hope, key) != value  # each row changes the default
    with pytest.raises(ValueError, match="unknown sweep 'hope_abl'"):
        named.named_axes("hope_abl", hope)


def test_cms_levels_keep_the_three_tuples_equal_and_fit_the_sequence(hope):
    (axis,) = named.named_axes("cms_levels", hope)
    periods = []
    for opt in axis:
        o = dict(opt.overrides)
        n = len(o["model.cms.periods"])
        assert len(o["model.cms.hidden"]) == n and len(o["model.cms.inner_lr"]) == n
        assert max(o["model.cms.periods"]) <= hope.data.seq_len
        periods.append(o["model.cms.periods"])
    assert periods == [(16,), (16, 64), (16, 64, 256), (16, 32), (16, 256)]


def test_chunk_sizes_and_optimizers(hope, transformer):
    chunks, memory_chunks = named.named_axes("chunk_sizes", hope)
    for axis in (chunks, memory_chunks):
        assert all(hope.data.seq_len % v == 0 for o in axis for _, v in o.overrides)
    assert [dict(o.overrides)["model.memory.chunk_size"] for o in chunks] == [8, 16, 32, 64]
    (titans,) = named.named_axes("chunk_sizes", configs.load("titans_tiny"))
    assert [o.label for o in titans] == ["chunk=4", "chunk=8", "chunk=16", "chunk=32"]
    with pytest.raises(ValueError, match="sweep 'chunk_sizes' sets model.memory.chunk_size"):
        named.named_axes("chunk_sizes", transformer)
    (opts,) = named.named_axes("optimizers", transformer)
    assert [o.label for o in opts] == list(OPTIMIZERS) and [o.label for o in opts][:2] == ["adamw", "m3"]
    assert len(opts) == 12  # AdamW and the eleven deep optimizers of nl_jax.optim


def test_point_commands_parse_back_to_the_point_config(hope):
    """The --config.* arguments of every cms_levels point, parsed by ml_collections as the pretrain
    command parses them, give the same config as applying the point in-process."""
    from experiments import config_flag

    base = {"train.steps": 7, "optim.lr": 2e-3}
    cfg = configs.load("hope_tiny")
    for k, v in base.items():
        grid.set_field(cfg, k, v)
    plan = make_plan("hope_tiny", cfg, base, sweep="cms_levels", grid_flags=["model.cms.signal=none,local"])
    assert len(plan.points) == 10 and plan.root.endswith("hope_tiny_cms_levels_grid")
    assert set(plan.steps.values()) == {7}
    for point in plan.points:
        args = plan.pretrain_args(point)
        assert args[:4] == [
            "-m",
            "experiments.pretrain",
            "--config=hope_tiny",
            f"--workdir={plan.root}/{point.name}",
        ]
        argv = ["prog", *args[2:]]
        fv = flags.FlagValues()
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        holder = config_flag.define(fv, sys_argv=argv)
        fv(argv)
        want = grid.point_config(cfg, point)
        assert holder.value.to_dict() == want.to_dict(), point.name
    with pytest.raises(ValueError, match="optim.lr is both set by --config"):
        make_plan("hope_tiny", cfg, base, grid_flags=["optim.lr=1e-3,3e-3"])
