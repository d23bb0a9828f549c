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
from dataclasses import dataclass
from pathlib import Path


from .config import Config
from .console import console
from .data.manifest import ManifestRow
from .errors import CacheError
from .fsutil import format_bytes
from .models.base import ModelFamily
from .workspace import Workspace

DISK_HEADROOM = 1.10  # the cache may take this much more than estimated (headers, index)


@dataclass(frozen=True)
class CacheGap:
    """What the cache lacks for a run, and what filling it would cost."""

    missing_latents: int
    missing_texts: int
    estimated_bytes: int

    @property
    def complete(self) -> bool:
        return not self.missing_latents and not self.missing_texts


def cache_gap(ws: Workspace, config: Config, family: ModelFamily,
              rows: list[ManifestRow]) -> CacheGap:
    """The entries a run on `rows` needs that the cache lacks (`check_cache_complete`'s rule),
    and their estimated size on disk. Loads no weights."""
    from .data.cache import Cache, CacheIndex, prompts_to_cache, present_keys, training_texts

    cache = Cache.open(ws, config, family)
    prompts = prompts_to_cache(ws, config, family) if config.train.sample_every > 0 else []
    plan = cache.plan(rows, random_flip=config.data.random_flip,
                      captions=list(prompts) + training_texts(config, family))
    present: set[str] = set()
    if cache.index_path.is_file():
        with CacheIndex(cache.index_path) as index:
            present = present_keys(cache, index, plan)
    latents = [job for key, job in plan.latents.items() if key not in present]
    texts = [key for key in plan.texts if key not in present]
    itemsize = 2 if config.precompute.mixed_precision == "bf16" else 4
    latent = family.latent
    latent_bytes = sum(2 * latent.channels * (job.row.bucket_h // latent.spatial_factor)
                       * (job.row.bucket_w // latent.spatial_factor) for job in latents)
    text_bytes = len(texts) * family.text_tokens() * family.denoiser_shape().text_dim
    return CacheGap(len(latents), len(texts), int((latent_bytes + text_bytes) * itemsize))


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds (or will hold) `folder`."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def fill_decision(gap: CacheGap, encodes_on_the_fly: int, free: int) -> tuple[bool, str]:
    """Whether to fill the cache before training, and the one-line reason either way."""
    if encodes_on_the_fly <= gap.missing_latents:
        return False, (f"the run encodes {encodes_on_the_fly} image variants, filling the cache "
                       f"would encode {gap.missing_latents}: no gain")
    needed = int(gap.estimated_bytes * DISK_HEADROOM)
    if needed > free:
        return False, (f"the missing entries need about {format_bytes(needed)}, the cache's "
                       f"disk has {format_bytes(free)} free")
    return True, (f"the run would encode {encodes_on_the_fly} image variants on the fly; the "
                  f"cache lacks {gap.missing_latents} latents and {gap.missing_texts} captions "
                  f"(about {format_bytes(gap.estimated_bytes)})")


def make_source(ws: Workspace, config: Config, family: ModelFamily, rows: list[ManifestRow],
                encodes_on_the_fly: int = 0):
    """The run's data source: the cache (filled first when that pays off), else on-the-fly
    encoding (see the module doc). `encodes_on_the_fly`: image variants the whole run would
    encode without a cache (samples per step x steps)."""
    from .data.batches import CachedSource, OnTheFlySource
    from .data.cache import Cache, check_cache_complete
    from .engine.setup import process_state

    if config.train.use_precomputed_data:
        gap = cache_gap(ws, config, family, rows)
        if gap.complete:
            console.info("training from the precompute cache (complete for this run; the VAE "
                         "and text encoder are not loaded)")
            return CachedSource(Cache.open(ws, config, family))
        fill, reason = fill_decision(gap, encodes_on_the_fly, free_bytes(ws.cache_dir(config)))
        if fill:
            console.info(f"filling the precompute cache before training: {reason} "
                         "(--no-use-precomputed-data encodes every step instead)")
            _fill_cache(ws, config)
            try:
                check_cache_complete(ws, config, family, rows)
            except CacheError as exc:  # filled by another process's rules: say so, go on
                console.warn(f"the cache is still incomplete after filling ({exc}); encoding "
                             "on the fly")
            else:
                return CachedSource(Cache.open(ws, config, family))
        else:
            console.info(f"encoding images and captions on the fly: {reason}")
    else:
        console.info("encoding images and captions on the fly (--no-use-precomputed-data)")
    state = process_state()
    text_device = "cpu" if config.train.text_encoder_device == "cpu" else state.device
    return OnTheFlySource(family, family.load_vae(), family.load_text_encoder(device=text_device),
                          config.data)


def _fill_cache(ws: Workspace, config: Config) -> None:
    """`ditctl precompute` in the main process; the others wait for it."""
    from .engine.setup import process_state
    from .precompute import run_precompute

    state = process_state()
    if state.is_main_process:
        run_precompute(ws, config, device=state.device)
    state.wait_for_everyone()
