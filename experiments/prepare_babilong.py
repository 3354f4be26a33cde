r"""BABILong rows as training text: one JSON line {"text": prompt + " " + answer} per row, in the
template the `babilong` evaluation suite asks with (nl_jax/eval/babilong.py), for fine-tuning with
`experiments.pretrain` on `data.source="jsonl"`.

    python -m experiments.prepare_babilong --input_dir=/data/babilong-train-5k-samples \
        --tasks=qa1,qa2,qa3,qa4,qa5 --lengths=0k,1k,2k --output=/data/babilong_train.jsonl

`--input_dir` holds the release's files in any of its layouts: `data/<task>/<length>.json`
(RMT-team/babilong-train-5k-samples), `<length>/<task>-*.parquet` or `<length>/<task>.jsonl`.
Rows are written task by task, length by length, in file order; `--limit` caps the rows per task and
length.
"""

import json
import os
import sys

from absl import flags

from experiments import cli

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "a directory of BABILong files", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "the JSON lines file to write", required=True)
_TASKS = flags.DEFINE_list("tasks", ["qa1", "qa2", "qa3", "qa4", "qa5"], "BABILong tasks (qa1-qa20)")
_LENGTHS = flags.DEFINE_list("lengths", [], "length names, e.g. 0k,1k,2k (default: every one in --input_dir)")
_LIMIT = flags.DEFINE_integer("limit", 0, "rows per task and length (0: all)", lower_bound=0)


def main(argv):
    if len(argv) > 1:
        raise cli.CommandError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nl_jax.eval import babilong

    root = _INPUT_DIR.value
    if not os.path.isdir(root):
        raise cli.CommandError(f"--input_dir={root}: no such directory")
    bad = [t for t in _TASKS.value if t not in babilong.TASKS]
    if bad:
        raise cli.CommandError(f"--tasks: unknown {bad}; choose from qa1 ... qa20")
    lengths = _LENGTHS.value or babilong.lengths_in(root)
    files = {(t, n): babilong.task_files(root, n, t) for t in _TASKS.value for n in lengths}
    if not any(files.values()):
        raise cli.CommandError(
            f"--input_dir={root} has no BABILong file for --tasks={','.join(_TASKS.value)} at lengths "
            f"{lengths or '(none found)'}; expected data/<task>/<length>.json, <length>/<task>-*.parquet "
            "or <length>/<task>.jsonl"
        )
    rows = 0
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        for (task, length), paths in files.items():
            if not paths:
                print(f"warning: skipped {task}/{length}: no file in {root}", file=sys.stderr, flush=True)
                continue
            for example in babilong.read_examples(paths, _LIMIT.value):
                f.write(json.dumps({"text": babilong.training_text(example)}) + "\n")
                rows += 1
    print(f"{rows} BABILong rows -> {_OUTPUT.value}", flush=True)


if __name__ == "__main__":
    cli.run(main)
