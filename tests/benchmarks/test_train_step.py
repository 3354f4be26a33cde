"""benchmarks.train_step's equal-parameter rows, without training.

Run in a subprocess: the benchmark defines absl flags (`steps`, `lengths`) that library modules the
other tests import define too."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json
    from benchmarks.config_overrides import apply_overrides, parse_value
    from benchmarks.train_step import matched_mlp_hidden
    from experiments import configs
    from nl_jax.models import count_params

    out = {}
    extra = {"model.num_layers": 2}
    target = count_params(apply_overrides(configs.load("hope_tiny"), extra).model)
    for name in ("transformer_tiny", "titans_tiny"):
        width = matched_mlp_hidden(name, target, extra)
        cfg = apply_overrides(configs.load(name), {**extra, "model.mlp_hidden": width}).model
        out[name] = [width, count_params(cfg), target]
    try:
        apply_overrides(configs.load("hope_tiny"), {"model.cms.no_such_field": 1})
    except ValueError as e:
        out["error"] = str(e)
    out["parsed"] = [parse_value("(16,64)"), parse_value("False"), parse_value("ntp")]
    print(json.dumps(out))
    """
)


def test_baselines_are_sized_to_the_hope_config_and_overrides_are_checked():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("transformer_tiny", "titans_tiny"):
        width, params, target = out[name]
        assert width % 8 == 0
        # The solved width is the multiple of 8 closest to the target: one step of 8 changes the
        # count by 3 x 8 x d_model per layer.
        assert abs(params - target) <= 3 * 8 * 128 * 2 / 2, (name, params, target)
    assert "unknown config field 'model.cms.no_such_field'" in out["error"]
    assert out["parsed"] == [[16, 64], False, "ntp"]


def test_a_row_times_its_steps_after_the_warmup():
    """One row's worker, as the benchmark runs it: a tiny Transformer++, 1 untimed and 2 timed steps."""
    overrides = {
        "model.d_model": 32,
        "model.num_layers": 1,
        "model.mlp_hidden": 64,
        "data.seq_len": 32,
        "data.global_batch_size": 8,  # the tests run on 8 CPU devices
    }
    args = ["--worker_config=transformer_tiny", f"--worker_overrides={json.dumps(overrides)}"]
    args += ["--steps=2", "--warmup=1", "--worker_start=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, row
    assert row["first_step_s"] > 0 and row["peak_rss_gb"] > 0


MEDIAN_SCRIPT = textwrap.dedent(
    """
    import json
    from benchmarks.train_step import length_rows, median_round, round_schedule

    ours = [{"model": "a", "tokens_per_s": t, "round": i} for i, t in enumerate((100.0, 300.0, 200.0))]
    theirs = [{"model": "b", "tokens_per_s": t, "round": i} for i, t in enumerate((110.0, 240.0, 260.0))]
    out = {
        "ours": median_round(ours),
        "theirs": median_round(theirs, ours),
        "even": median_round(ours[:2]),
        "failed": median_round([ours[0], {"model": "a", "error": "boom"}]),
        "failed_ref": median_round(theirs, [ours[0], {"model": "a", "error": "boom"}, ours[2]]),
        "schedule": round_schedule(["titans", "transformer", "h1"], 2),
        "schedule_none": round_schedule(["titans", "h1"], 2),
        "length": length_rows({"transformer": ours, "h": [{"model": "h", "tokens_per_s": t} for t in (40.0, 30.0, 10.0)]}),
        "length_alone": length_rows({"h": theirs}),
    }
    print(json.dumps(out))
    """
)


def test_rounds_give_the_median_round_and_the_median_paired_ratio():
    proc = subprocess.run([sys.executable, "-c", MEDIAN_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ours"]["round"] == 2 and out["ours"]["rounds"] == [100.0, 300.0, 200.0]
    # Ratios are paired by round (1.1, 0.8, 1.3), not taken between the two medians (240 / 200 = 1.2).
    assert out["theirs"]["tokens_per_s"] == 240.0
    assert out["theirs"]["ratio"] == pytest.approx(1.1)
    assert out["theirs"]["round_ratios"] == pytest.approx([1.1, 0.8, 1.3])  # in round order
    assert out["even"]["tokens_per_s"] == 100.0  # the lower of the middle two
    assert out["failed"] == {"model": "a", "error": "boom"}
    assert out["failed_ref"]["ratio"] is None
    # every round runs the reference first, then the other rows in order
    assert out["schedule"] == ["transformer", "titans", "h1", "transformer", "titans", "h1"]
    assert out["schedule_none"] == ["titans", "h1", "titans", "h1"]
    # a length's rows: the reference's median round first, every other row's against it round by round
    ref, h = out["length"]
    assert ref["model"] == "a" and ref["tokens_per_s"] == 200.0 and "ratio" not in ref
    assert h["tokens_per_s"] == 30.0 and h["round_ratios"] == pytest.approx([0.4, 0.1, 0.05])
    assert h["ratio"] == pytest.approx(0.1)  # not 30 / 200: the median of the paired ratios
    assert [r["tokens_per_s"] for r in out["length_alone"]] == [240.0] and "ratio" not in out["length_alone"][0]
