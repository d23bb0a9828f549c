"""The validation data of `ditctl eval` and of evaluation during training, and its inputs.

Validation rows are the manifest's val split; without one, the last [eval] holdout_fraction of
each dataset's training rows, which training then leaves out (`split_holdout`). Their latents and the
prompt embeddings come from the precompute cache when it holds them all, else from the encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..config import Config
from ..console import console
from ..data.batches import CachedSource
from ..data.cache import Cache
from ..data.cache_plan import check_cache_complete
from ..data.manifest import ManifestRow, read_manifest
from ..data.sample_table import SampleTable, row_datasets, select
from ..errors import CacheError, DataError
from ..models.base import Conditioning, ModelFamily, unconditional_text
from ..sampling import PromptEmbeddings
from ..workspace import Workspace


@dataclass(frozen=True)
class ValidationSet:
    rows: list[ManifestRow]
    kind: str  # "val": the validation split; "holdout": the last rows of the training split
    description: str


def split_holdout(train: Sequence[ManifestRow], fraction: float,
                  ) -> tuple[Sequence[ManifestRow], Sequence[ManifestRow]]:
    """(rows to train on, held-out rows): the last round(len * fraction) rows of each dataset
    are held out (so each dataset is measured, and a small one is not held out whole by a
    large one's share). A `SampleTable` gives two tables, a list two lists.

    Training must use the first part when the workspace has no validation split, or the
    "held-out" loss is measured on images the model has trained on.
    """
    by_dataset: dict[int, list[int]] = {}  # in order of each dataset's first row
    for index, dataset in enumerate(row_datasets(train).tolist()):
        by_dataset.setdefault(dataset, []).append(index)
    keep, held = [], []
    for indices in by_dataset.values():
        count = round(len(indices) * fraction)
        keep += indices[:len(indices) - count]
        held += indices[len(indices) - count:]
    return select(train, keep), select(train, held)


def validation_set(ws: Workspace, config: Config) -> ValidationSet:
    """The manifest's val split; without one, the last `holdout_fraction` of the train rows."""
    val = read_manifest(ws, "val")
    if val:
        return ValidationSet(val, "val", f"validation split ({len(val)} images)")
    # the training rows as a table: only the held-out ones become Python objects
    train = SampleTable.read(ws.manifest_db, "train")
    held = list(split_holdout(train, config.eval.holdout_fraction)[1])
    count = len(held)
    if not train or count == 0:
        raise DataError("no validation data: the manifest has no val split and [eval] "
                        f"holdout_fraction = {config.eval.holdout_fraction:g} of "
                        f"{len(train)} training images is none",
                        hint="set [data] val_data_path and run `ditctl ingest`, or raise "
                             "[eval] holdout_fraction")
    if len(set(train.datasets.tolist())) > 1:
        return ValidationSet(held, "holdout",
                             f"held-out slice of training data (the last {count} of "
                             f"{len(train)} training images: each dataset's last "
                             f"{config.eval.holdout_fraction:g})")
    return ValidationSet(held, "holdout",
                         f"held-out slice of training data (last {count} of {len(train)} "
                         "training images)")


def cached_inputs(ws: Workspace, config: Config, family: ModelFamily,
                  rows: Sequence[ManifestRow], texts: Sequence[str]) -> tuple[Any, Any]:
    """(a CachedSource for the rows, one for the texts): each only when the precompute cache
    holds everything it must give (else None). Loads no weights."""
    found = []
    for what, kwargs in (("validation images", dict(rows=list(rows), prompts=[])),
                         ("prompts", dict(rows=[], prompts=list(texts)))):
        try:
            check_cache_complete(ws, config, family, **kwargs)
            found.append(CachedSource(Cache.open(ws, config, family)))
        except CacheError as exc:
            console.info(f"{what}: encoded on the fly, the cache lacks some ({exc})")
            found.append(None)
    return found[0], found[1]


def cached_embeddings(family: ModelFamily, source: Any, prompts: Sequence[str],
                      negative_prompt: str | None) -> PromptEmbeddings:
    """`encode_prompts`' result read from the cache (the negative as `unconditional_text`)."""
    cond = Conditioning.cat([source.conditioning(p) for p in prompts])
    negative_text = unconditional_text(family, negative_prompt)
    negative = None if negative_text is None else source.conditioning(negative_text)
    return PromptEmbeddings(cond, negative)
