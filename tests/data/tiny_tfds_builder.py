"""A tiny TFDS builder over a local text file, for offline tests of the `tfds` source.

It must live in an importable module: tfds derives the builder's code path from its module, so a
builder defined in a test function or `__main__` fails. Importing this module registers the name
`tiny_text`. Input: `manual_dir/tiny.txt`, one document per line; every 4th line is validation.
"""

import os

import tensorflow_datasets as tfds


class TinyText(tfds.core.GeneratorBasedBuilder):
    """One `text` feature per line of manual_dir/tiny.txt."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put tiny.txt (one document per line) in manual_dir."

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        path = os.path.join(dl_manager.manual_dir, "tiny.txt")
        return {
            "train": self._generate_examples(path, keep=lambda i: i % 4 != 3),
            "validation": self._generate_examples(path, keep=lambda i: i % 4 == 3),
        }

    def _generate_examples(self, path, keep):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if keep(i) and line.strip():
                    yield i, {"text": line.rstrip("\n")}


def build(data_dir: str, manual_dir: str) -> None:
    """Prepares the dataset as ArrayRecord (the format tfds.data_source reads without TensorFlow)."""
    TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
