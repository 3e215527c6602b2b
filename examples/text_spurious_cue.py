"""A spurious cue on real text (HANS-style), and FastIF's error correction on MiniLM.

Rotten Tomatoes snippets with a planted cue word ("tuesday") that appears in fresh reviews and not in rotten ones on
95% of the training data, and is reversed on a challenge split. MiniLM's top layers are fine-tuned (the frozen lower
layers run once, their outputs cached); the model learns the cue and fails on the challenge split. Then FastIF's
correction: anchors from the challenge split, the most helpful training points for them (kNN candidates, LiSSA,
influence over the top layer and the head), one SGD step on them, repeated; against the most harmful and random
points, the same number of steps, over several seeds, every run from the same trained weights.

    python examples/text_spurious_cue.py            # the real run: 800 snippets, 5 seeds x 10 steps (minutes)
    python examples/text_spurious_cue.py --small    # CI size (seconds)

Writes ``spurious_cue.json``, ``spurious_cue.md`` and ``spurious_cue_correction.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The experiments' shared code sits beside this script (examples/text_experiments.py), not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_experiments import (  # noqa: E402
    CUE_FULL,
    CUE_SMALL,
    add_text_arguments,
    spurious_cue_experiment,
    train_settings,
    train_text_model,
    write_spurious_cue_report,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, measure the challenge drop, compare corrections; write the report; return its content."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(parser, "runs/text_spurious_cue")
    parser.add_argument("--seeds", type=int, default=None, help="correction seeds (default 5; 2 with --small)")
    parser.add_argument("--num-steps", type=int, default=None, help="correction steps per run")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the correction steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(CUE_SMALL if args.small else CUE_FULL)
    if args.seeds is not None:
        settings["seeds"] = tuple(range(args.seeds))
    if args.num_steps is not None:
        settings["num_steps"] = args.num_steps
    if args.lr is not None:
        settings["lr"] = args.lr
    out = Path(args.out)
    start = time.perf_counter()
    run = train_text_model(out, **train_settings(args))
    result = spurious_cue_experiment(run, **settings)
    result["seconds"]["total"] = time.perf_counter() - start
    paths = write_spurious_cue_report(out, run, result)
    print(paths["markdown"].read_text())
    return {"run": run.info, "experiment": result, "files": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    main()
