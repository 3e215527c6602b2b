"""FastIF's recall figure on MiniLM: are the most influential training points among the nearest neighbours?

For test points of the Rotten Tomatoes model, every training point is scored (the original influence functions:
no candidate filter), and the recall of the top-10 helpful and harmful points among the k nearest training points in
feature space (the snapshot's kNN index) is plotted as k grows, with the random baseline k / N.

    python examples/text_knn_recall.py            # the real run (minutes)
    python examples/text_knn_recall.py --small    # CI size (seconds)

Writes ``knn_recall.json``, ``knn_recall.md`` and ``knn_recall.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The experiments' shared code sits beside this script (examples/text_experiments.py), not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_experiments import (  # noqa: E402
    EXPLAIN_FULL,
    EXPLAIN_SMALL,
    add_text_arguments,
    fixed_lissa,
    knn_recall_experiment,
    train_settings,
    train_text_model,
    write_knn_recall_report,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, score every training point for some test points, measure recall against k; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(parser, "runs/text_knn_recall")
    parser.add_argument("--num-test", type=int, default=None, help="test points explained")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(EXPLAIN_SMALL if args.small else EXPLAIN_FULL)
    out = Path(args.out)
    run = train_text_model(out, **train_settings(args))
    train = run.loader("train")
    ihvp = fixed_lissa(
        run.head, train, recursion_depth=settings["recursion_depth"], batch_size=settings["lissa_batch_size"]
    )
    num_test = args.num_test if args.num_test is not None else settings["num_test"]
    result = knn_recall_experiment(run, ihvp=ihvp, num_test=num_test, seed=args.seed)
    paths = write_knn_recall_report(out, run, result)
    print(paths["markdown"].read_text())
    return {"run": run.info, "experiment": result, "files": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    main()
