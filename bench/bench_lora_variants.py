"""Each adapter kind learns, not only runs: the `--example` LoRA of the tiny base trained as
LoRA, DoRA, LoKr and LoHa ([lora] lora_type), each scored with the concept check the demo tests
use (the held-out colour "green" must reach 0.7), exactly as bench_quantized_lora scores a base
precision (its `example_run`: 1000 steps, rank 16, from the precomputed cache, fp32 base).

    python -m bench lora_variants [--quick]
    python -m bench.bench_lora_variants [--quick] [--variants dora,lokr,loha,lora]
                                        [--set lokr:train.learning_rate=8e-3 ...]
                                        [--threads N] [--no-record]

--variants runs only those kinds, in that order (default: dora, lokr, loha); --set changes one
key for one kind (`kind:section.key=value`, repeatable; values are TOML scalars), so a kind's
own recipe (LoKr trains far fewer parameters and usually wants a higher learning rate) is
recorded in the block's command line and in the table's `settings` column.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_quantized_lora import example_run
from bench.common import offline_environment

VARIANTS = ("dora", "lokr", "loha")
KINDS = ("lora", *VARIANTS)


def parse_set(text: str) -> tuple[str, str, Any]:
    """"kind:section.key=value" -> (kind, "section.key", value parsed as a TOML scalar)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    kind, _, assignment = text.partition(":")
    key, _, raw = assignment.partition("=")
    if kind not in KINDS or "." not in key or not raw:
        raise ValueError(f"--set {text!r}: write kind:section.key=value with kind one of "
                         f"{', '.join(KINDS)}")
    return kind, key.strip(), tomllib.loads(f"v = {raw.strip()}")["v"]


def run(quick: bool, variants: tuple[str, ...] | None = None,
        extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train and score each kind of `variants` (default VARIANTS); `extra[kind]` are its own
    "section.key" overrides."""
    offline_environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-variants-") as tmp:
        for i, kind in enumerate(variants or VARIANTS):
            own = (extra or {}).get(kind, {})
            result = example_run(Path(tmp) / f"ws{i}", "auto", "no", 20 if quick else None,
                                 {"lora.lora_type": kind, **own})
            settings = ", ".join(f"{k}={v}" for k, v in own.items()) or "example defaults"
            rows.append({"lora_type": kind, "settings": settings, **result})
            print(rows[-1], flush=True)
    return {"table": rows,
            "all_reach_green_0.7": all(r["green_ge_0.7"] for r in rows) if not quick else None}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.common import report_standalone

    parser = argparse.ArgumentParser(prog="python -m bench.bench_lora_variants",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps a kind (smoke run)")
    parser.add_argument("--variants", type=lambda text: tuple(v for v in text.split(",") if v),
                        help=f"of {','.join(KINDS)} (default: {','.join(VARIANTS)})")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        metavar="KIND:SECTION.KEY=VALUE", help="one key for one kind")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-record", action="store_true", help="append nothing to RESULTS.md")
    args = parser.parse_args(argv)
    bad = [v for v in args.variants or () if v not in KINDS]
    if bad:
        parser.error(f"unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    extra: dict[str, dict[str, Any]] = {}
    for text in args.sets:
        try:
            kind, key, value = parse_set(text)
        except ValueError as exc:
            parser.error(str(exc))
        extra.setdefault(kind, {})[key] = value
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = run(args.quick, args.variants, extra)
    report_standalone("lora_variants", "bench_lora_variants", args.quick, results, started, argv,
                      record=not args.no_record)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
