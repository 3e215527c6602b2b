"""FastIF's explanations, tested by simulatability, on MiniLM (text) and on the digits CNN.

For each test point, influence is taken on the loss of the class the model itself predicted. A copy of the model is
fine-tuned for a few steps on the k most helpful training points, on k random ones, or on the k most harmful ones;
if the explanations are faithful, the helpful points should raise the probability of the model's own prediction
more often than random points, and the harmful ones should lower it.

    python examples/text_simulatability.py            # the real run (minutes)
    python examples/text_simulatability.py --small    # CI size (seconds)

Writes ``simulatability.json``, ``simulatability.md`` and ``simulatability.png`` into ``--out``.
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
    DIGITS_FULL,
    DIGITS_SMALL,
    EXPLAIN_FULL,
    EXPLAIN_SMALL,
    add_text_arguments,
    fixed_lissa,
    simulatability_experiment,
    train_digits_model,
    train_settings,
    train_text_model,
    write_simulatability_report,
)

from lightning_fastif.core.ihvp import LiSSA


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both models, measure the rates for helpful, random and harmful points; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(parser, "runs/text_simulatability")
    parser.add_argument("--num-test", type=int, default=None, help="text test points explained")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = dict(EXPLAIN_SMALL if args.small else EXPLAIN_FULL)
    digits = dict(DIGITS_SMALL if args.small else DIGITS_FULL)
    out = Path(args.out)

    run = train_text_model(out, **train_settings(args))
    train = run.loader("train")
    ihvp = fixed_lissa(run.head, train, recursion_depth=text["recursion_depth"], batch_size=text["lissa_batch_size"])
    text_result = simulatability_experiment(
        run.head,
        train,
        run.loader("test"),
        ihvp=ihvp,
        num_test=args.num_test if args.num_test is not None else text["num_test"],
        k=text["k"],
        steps=text["steps"],
        lr=text["lr"],
        seed=args.seed,
    )

    model, dm = train_digits_model(epochs=digits["epochs"], seed=args.seed)
    digits_ihvp = LiSSA(damping=0.01, recursion_depth=digits["recursion_depth"], batch_size=8, residual_examples=0)
    digits_result = simulatability_experiment(
        model,
        dm.train_dataset,
        dm.test_dataset,
        ihvp=digits_ihvp,
        num_test=digits["num_test"],
        k=digits["k"],
        steps=digits["steps"],
        lr=digits["lr"],
        seed=args.seed,
    )
    results = {"text": text_result, "digits": digits_result}
    models = {
        "text": f"{run.info['encoder']}, influence over {', '.join(run.info['influence_params'])}, "
        f"{run.info['sizes']['train']} training snippets",
        "digits": f"DigitsClassifier (all {sum(p.numel() for p in model.parameters()):,} parameters), "
        f"{len(dm.train_dataset)} training images",
    }
    paths = write_simulatability_report(out, results, models)
    print(paths["markdown"].read_text())
    return {"run": run.info, "results": results, "files": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    main()
