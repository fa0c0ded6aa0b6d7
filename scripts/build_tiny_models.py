#!/usr/bin/env python
"""Build the tiny testbed base models (cached; skipped when present) and print their held-out accuracy as JSON.

    python scripts/build_tiny_models.py [NAME ...] [--force] [--workers N] [--ship]

Each checkpoint trains on one CPU thread (deterministic, and the most CPU-efficient for models this small);
checkpoints build in parallel, one process per core. A checkpoint that ships with the package (`dlm_rl/checkpoints`)
is used as shipped; `--force --ship` rebuilds it and replaces the shipped copy (weights, metrics, checksums).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor


def _build(name: str, force: bool) -> dict:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    from dlm_rl.testbed import build

    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its loss logs; stdout is for the JSON
        return build(name, force=force)


def main() -> int:
    from dlm_rl.testbed import CHECKPOINTS, STANDARD_CHECKPOINTS, targets_met

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=STANDARD_CHECKPOINTS,
                        help=f"default: {STANDARD_CHECKPOINTS}; also "
                             f"{sorted(set(CHECKPOINTS) - set(STANDARD_CHECKPOINTS))}")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ship", action="store_true", help="copy the built checkpoints into the package")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in CHECKPOINTS]
    if unknown:
        parser.error(f"unknown checkpoints {unknown}; choose from {list(CHECKPOINTS)}")
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch thread pools
    results = {}
    # Checkpoints that start from another one build in a later wave, after their parent.
    for wave in _waves(args.names, CHECKPOINTS):
        wave.sort(key=lambda n: -CHECKPOINTS[n].max_steps)  # longest first, so the workers finish together
        with ProcessPoolExecutor(max_workers=min(args.workers, len(wave)), mp_context=spawn) as pool:
            results.update(zip(wave, pool.map(_build, wave, [args.force] * len(wave))))
    report = [{**results[n], "target_met": targets_met(results[n])} for n in args.names]
    if args.ship:
        from dlm_rl.testbed import ship

        for entry in report:
            entry["shipped_to"] = ship(entry["name"])
    print(json.dumps(report, indent=2))
    return 0 if all(r["target_met"] is not False for r in report) else 1  # None: not evaluated


def _waves(names: list[str], checkpoints: dict) -> list[list[str]]:
    """Group names by how many `init` parents they have."""
    def depth(name):
        return 0 if checkpoints[name].init is None else 1 + depth(checkpoints[name].init)

    waves = {}
    for name in names:
        waves.setdefault(depth(name), []).append(name)
    return [waves[d] for d in sorted(waves)]


if __name__ == "__main__":
    sys.exit(main())
