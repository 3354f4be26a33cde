"""The text-classification datasets of the class-incremental suite, read from their published files
under `<data_dir>/class_incremental/<dataset>/` (downloaded beforehand; nothing is fetched here):

  clinc150   data_full.json (github.com/clinc/oos-eval, data/): {"train", "val", "test", "oos_train",
             "oos_val", "oos_test"}, each a list of [text, intent]. The 150 in-scope intents only:
             the out-of-scope queries have no class to learn.
  banking77  train.csv, test.csv (github.com/PolyAI-LDN/task-specific-datasets, banking_data/): a
             header "text,category", then one query and its intent per row.
  dbpedia14  train.csv, test.csv, classes.txt (the DBpedia ontology classification set of Zhang et al.
             2015, "Character-level Convolutional Networks for Text Classification", dbpedia_csv/):
             rows "label,title,content" without a header, label 1-14 the line of classes.txt naming
             the class. The text is the title, a full stop and the content.

Each loader returns (train, test) as lists of (text, class name), in file order: the classes then
arrive in the order the training file first shows them (`continual.make_stages`).
"""

from __future__ import annotations

import csv
import json
import os

DATASETS = ("clinc150", "banking77", "dbpedia14")
TITLES = {"clinc150": "CLINC-150", "banking77": "Banking77", "dbpedia14": "DBpedia"}
FILES = {
    "clinc150": ("data_full.json",),
    "banking77": ("train.csv", "test.csv"),
    "dbpedia14": ("train.csv", "test.csv", "classes.txt"),
}

Examples = list[tuple[str, str]]


def dataset_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "class_incremental", name)


def missing_files(data_dir: str, name: str) -> list[str]:
    """The files of dataset `name` that are not under `data_dir` (all of them without a data_dir)."""
    where = dataset_dir(data_dir, name)
    return [
        os.path.join(where, f)
        for f in FILES[name]
        if not (data_dir and os.path.isfile(os.path.join(where, f)))
    ]


def load(data_dir: str, name: str) -> tuple[Examples, Examples]:
    """(train, test) of dataset `name`; ValueError naming the file and what it should hold."""
    where = dataset_dir(data_dir, name)
    if name == "clinc150":
        return _clinc(os.path.join(where, "data_full.json"))
    if name == "banking77":
        return _banking(os.path.join(where, "train.csv")), _banking(os.path.join(where, "test.csv"))
    if name == "dbpedia14":
        classes = _lines(os.path.join(where, "classes.txt"))
        return (
            _dbpedia(os.path.join(where, "train.csv"), classes),
            _dbpedia(os.path.join(where, "test.csv"), classes),
        )
    raise ValueError(f"unknown class-incremental dataset {name!r}; choose from {', '.join(DATASETS)}")


def _clinc(path: str) -> tuple[Examples, Examples]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); expected CLINC-150's data_full.json") from e
    if not isinstance(data, dict) or "train" not in data or "test" not in data:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected CLINC-150's keys train, val, test, oos_*; got {got}")

    def pairs(split):
        out = []
        for i, row in enumerate(data[split]):
            if not (isinstance(row, list) and len(row) == 2):
                raise ValueError(f'{path}: "{split}"[{i}] is {row!r}; expected [text, intent]')
            out.append((str(row[0]), str(row[1])))
        return out

    return pairs("train"), pairs("test")


def _banking(path: str) -> Examples:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "category"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected Banking77's header text,category; got {reader.fieldnames}")
        out = [(row["text"], row["category"]) for row in reader]
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _dbpedia(path: str, classes: list[str]) -> Examples:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= len(classes):
                raise ValueError(
                    f"{path}:{i}: expected label (1-{len(classes)}, a line of classes.txt),title,content; "
                    f"got {row[:3]!r}"
                )
            out.append((f"{row[1].strip()}. {row[2].strip()}", classes[int(row[0]) - 1]))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out
