"""Dataset builders and scoring for the kvpress long-context lm-eval tasks (the YAMLs beside this file).

lm-eval calls a task's ``custom_dataset`` with the task metadata merged with ``--model_args`` and ``--metadata``.
Understood keys (others are ignored):
- ``max_seq_lengths``: prompt lengths in tokens (default 2048 and 4096),
  e.g. ``--metadata '{"max_seq_lengths":[2048]}'``;
- ``num_samples``: samples per length (default 50); ``seed``: generator seed (default 0);
- ``tokenizer``, else ``pretrained``: tokenizer that sizes the prompts (``default`` = the embedded default model).
  A ``pretrained`` whose tokenizer cannot be loaded (e.g. a hub id while offline) falls back, with a warning, to the
  approximate words x 1.3 counter; an explicit ``tokenizer`` that cannot be loaded is an error.
Everything is generated locally from ``kvpress.eval.tasks`` (no download), so it works from any working directory.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import datasets

from kvpress.eval.tasks.generator import DEFAULT_LENGTHS, make_tasks, score

DEFAULT_NUM_SAMPLES = 50
_log = logging.getLogger(__name__)


def _positive_int(value: Any, name: str) -> int:
    """``value`` as a positive int (an int or a string of digits), else a ValueError naming the metadata key."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    else:
        number = 0
    if number < 1:
        raise ValueError(f"metadata {name}={value!r} must be a positive integer")
    return number


def parse_lengths(value: Any) -> list[int]:
    """``max_seq_lengths`` as a list of positive ints (one int or a list of them)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError("metadata max_seq_lengths must not be empty")
    return [_positive_int(v, "max_seq_lengths") for v in values]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    """A local (or already cached) tokenizer; 'default' is the embedded default model's."""
    from transformers import AutoTokenizer

    from kvpress.default_model import default_model_path

    path = str(default_model_path()) if name.strip().lower() == "default" else name
    return AutoTokenizer.from_pretrained(path)


def resolve_tokenizer(metadata: dict[str, Any]):
    """The tokenizer named by ``tokenizer`` (must load) or ``pretrained`` (may fall back to None = approximate)."""
    explicit = metadata.get("tokenizer")
    if explicit is not None and not isinstance(explicit, str):
        return explicit  # a tokenizer object given through the Python API
    if explicit:
        return _load_tokenizer(explicit)
    pretrained = metadata.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        _log.warning("kvpress tasks: no tokenizer or pretrained in metadata; sizing prompts approximately.")
        return None
    try:
        return _load_tokenizer(pretrained)
    except (OSError, ValueError, ImportError) as err:
        _log.warning("kvpress tasks: cannot load tokenizer %r (%s); sizing prompts approximately.", pretrained, err)
        return None


def build_dataset(task: str, **metadata: Any) -> dict[str, datasets.Dataset]:
    """{"test": Dataset} of ``num_samples`` samples of ``task`` at each length in ``max_seq_lengths``."""
    lengths = parse_lengths(metadata.get("max_seq_lengths", list(DEFAULT_LENGTHS)))
    n = _positive_int(metadata.get("num_samples", DEFAULT_NUM_SAMPLES), "num_samples")
    seed = metadata.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"metadata seed={seed!r} must be an integer")
    tokenizer = resolve_tokenizer(metadata)
    rows = [sample for length in lengths for sample in make_tasks(task, n, length, tokenizer=tokenizer, seed=seed)]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def niah_single(**metadata: Any) -> dict[str, datasets.Dataset]:
    """One needle (a number for a word key) in the haystack."""
    return build_dataset("niah_single", **metadata)


def niah_multikey(**metadata: Any) -> dict[str, datasets.Dataset]:
    """Several needles with different keys; the question asks for one."""
    return build_dataset("niah_multikey", **metadata)


def niah_multivalue(**metadata: Any) -> dict[str, datasets.Dataset]:
    """Several values for one key; every value must be retrieved."""
    return build_dataset("niah_multivalue", **metadata)


def kv_retrieval(**metadata: Any) -> dict[str, datasets.Dataset]:
    """A JSON object of UUID pairs inside the haystack; the value of one key is asked."""
    return build_dataset("kv_retrieval", **metadata)


def variable_tracking(**metadata: Any) -> dict[str, datasets.Dataset]:
    """Chains of variable assignments; every variable bound to a value must be named."""
    return build_dataset("variable_tracking", **metadata)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Metric ``score``: the fraction of the sample's answers found in the generation (case-insensitive)."""
    return {"score": score(results[0], doc["answers"])}
