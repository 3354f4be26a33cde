"""Evaluation on 8 fake devices (batch sharded over data x fsdp, parameters by the rules table)
gives the numbers of one device."""

import jax
import ml_collections
import numpy as np
import pytest

from nl_jax.data import ByteTokenizer
from nl_jax.eval import loglikelihood as ll_lib
from nl_jax.eval import perplexity as ppl
from nl_jax.eval.runner import ModelRunner
from nl_jax.parallel.mesh import make_mesh

TOK = ByteTokenizer()


def _mesh(data, fsdp):
    cfg = ml_collections.ConfigDict(
        dict(ici_data_parallelism=data, ici_fsdp_parallelism=fsdp, ici_tensor_parallelism=1)
    )
    return make_mesh(cfg)


@pytest.mark.parametrize("data,fsdp", [(2, 4)])
def test_eight_devices_match_one(tiny_transformer, data, fsdp):
    assert len(jax.devices()) == 8
    mesh = _mesh(data, fsdp)
    single = ModelRunner(tiny_transformer, batch_size=8, length_bucket=32)
    sharded = ModelRunner(tiny_transformer, mesh=mesh, batch_size=8, length_bucket=32)
    tokens = np.random.default_rng(0).integers(3, 259, size=(11, 20))  # 11 rows: a padded last batch
    lp1, ok1 = single.score(tokens, np.roll(tokens, -1, 1))
    lp8, ok8 = sharded.score(tokens, np.roll(tokens, -1, 1))
    np.testing.assert_allclose(lp8, lp1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ok8, ok1)
    leaf = jax.tree.leaves(sharded.state)[0]
    assert len(leaf.sharding.device_set) == 8

    docs = ppl.documents_from_texts(["import os\nprint(os.sep)\n" * 3, "x = 1"], TOK)
    for mode in ("sliding", "stream"):
        a = ppl.perplexity(single, docs, context_len=16, stride=8, prefix_id=TOK.eos_id, mode=mode)
        b = ppl.perplexity(sharded, docs, context_len=16, stride=8, prefix_id=TOK.eos_id, mode=mode)
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-5)
    reqs = [("def f():", " return 1"), ("x =", " 2")]
    np.testing.assert_allclose(
        [s for s, _ in ll_lib.loglikelihood(sharded, TOK, reqs, max_len=64)],
        [s for s, _ in ll_lib.loglikelihood(single, TOK, reqs, max_len=64)],
        rtol=1e-5,
    )
