"""Where training gets its latents and text states: the precompute cache whenever it can.

With `[train] use_precomputed_data` on (the default):
- a cache that is complete for this run is used as it is, and the VAE and text encoder are
  never loaded;
- an incomplete one is filled first (`ditctl precompute`, run by the main process) when the run
  would encode more image variants on the fly than filling needs (it sees its images more than
  once) and the missing entries fit on the cache's disk: every image variant and caption is
  then encoded once instead of once per epoch;
- otherwise training encodes on the fly, and says why.
`--no-use-precomputed-data` (or `--no-precomputed-data`) always encodes on the fly.

Training from the cache equals training on the fly bit for bit (ditctl.data.cache: fp32 entries
are encoded one image per pass, exactly as `OnTheFlySource` does), so this choice changes the
speed, never the result — except where the user stores the cache at a lower precision
([precompute] mixed_precision), which they chose.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence


from .config import Config
from .console import console
from .data.cache import Cache
from .data.cache_plan import count_cache_gap
from .data.datasets import per_dataset, resolve_datasets
from .data.manifest import ManifestRow
from .fsutil import format_bytes
from .models.base import ModelFamily
from .workspace import Workspace

DISK_HEADROOM = 1.10  # the cache may take this much more than estimated (headers, index)


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds (or will hold) `folder`."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def fill_decision(missing_latents: int, missing_texts: int, estimated_bytes: int,
                  encodes_on_the_fly: int, free: int) -> tuple[bool, str]:
    """Whether to fill the cache before training, and the one-line reason either way."""
    if encodes_on_the_fly <= missing_latents:
        return False, (f"the run encodes {encodes_on_the_fly} image variants, filling the cache "
                       f"would encode {missing_latents}: no gain")
    needed = int(estimated_bytes * DISK_HEADROOM)
    if needed > free:
        return False, (f"the missing entries need about {format_bytes(needed)}, the cache's "
                       f"disk has {format_bytes(free)} free")
    return True, (f"the run would encode {encodes_on_the_fly} image variants on the fly; the "
                  f"cache lacks {missing_latents} latents and {missing_texts} captions "
                  f"(about {format_bytes(estimated_bytes)})")


def make_source(ws: Workspace, config: Config, family: ModelFamily, rows: Sequence[ManifestRow],
                encodes_on_the_fly: int = 0):
    """The run's data source: the cache (filled first when that pays off), else on-the-fly
    encoding (see the module doc). `encodes_on_the_fly`: image variants the whole run would
    encode without a cache (samples per step x steps).

    A dataset with shuffle_tags gets a new caption at every step: with the cache, its latents
    come from the cache and the text encoder stays loaded to encode the captions."""
    from .data.batches import CachedLatentsLiveText, CachedSource

    source = _image_source(ws, config, family, rows, encodes_on_the_fly)
    # on the fly, every caption is encoded anyway
    if not isinstance(source, CachedSource) or not any(
            d.shuffle_tags for d in resolve_datasets(config)):
        return source
    console.info("shuffle_tags: captions are encoded at every step (the text encoder is "
                 "loaded; latents come from the cache)")
    return CachedLatentsLiveText(source, family, family.load_text_encoder(
        device=_text_device(config)))


def _text_device(config: Config):
    from .engine.setup import process_state

    return "cpu" if config.train.text_encoder_device == "cpu" else process_state().device


def _image_source(ws: Workspace, config: Config, family: ModelFamily, rows: Sequence[ManifestRow],
                  encodes_on_the_fly: int):
    from .data.batches import CachedSource, OnTheFlySource

    if config.train.use_precomputed_data:
        # counted while streaming the rows: no cache plan of a million entries held
        gap = count_cache_gap(ws, config, family, rows)
        if gap.complete:
            console.info("training from the precompute cache (complete for this run; the VAE "
                         "and text encoder are not loaded)")
            return CachedSource(Cache.open(ws, config, family))
        fill, reason = fill_decision(gap.missing_latents, gap.missing_texts, gap.missing_bytes,
                                     encodes_on_the_fly, free_bytes(ws.cache_dir(config)))
        if fill:
            console.info(f"filling the precompute cache before training: {reason} "
                         "(--no-use-precomputed-data encodes every step instead)")
            _fill_cache(ws, config)
            gap = count_cache_gap(ws, config, family, rows)
            if gap.complete:
                return CachedSource(Cache.open(ws, config, family))
            # filled by another process's rules: say so, go on
            console.warn(f"the cache is still incomplete after filling ({gap.missing_latents} "
                         f"of {gap.latents} latents and {gap.missing_texts} of {gap.texts} "
                         "captions missing or stale); encoding on the fly")
        else:
            console.info(f"encoding images and captions on the fly: {reason}")
    else:
        console.info("encoding images and captions on the fly (--no-use-precomputed-data)")
    return OnTheFlySource(family, family.load_vae(),
                          family.load_text_encoder(device=_text_device(config)), config.data,
                          per_dataset(config, "center_crop"))


def _fill_cache(ws: Workspace, config: Config) -> None:
    """`ditctl precompute` in the main process; the others wait for it."""
    from .engine.setup import process_state
    from .precompute import run_precompute

    state = process_state()
    if state.is_main_process:
        run_precompute(ws, config, device=state.device)
    state.wait_for_everyone()
