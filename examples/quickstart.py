"""Quickstart: which training digits made the model predict *this*? (the Python API, no Hydra)

python examples/quickstart.py            # about a minute on 2 CPU cores
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_fastif import FeatureSnapshot, InfluenceModule, LiSSA
from lightning_fastif.app.data import DigitsDataModule
from lightning_fastif.app.models import DigitsClassifier

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="outputs/quickstart")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(1)  # small models are fastest on one thread
pl.seed_everything(0)

dm = DigitsDataModule(label_noise=0.05)
model = DigitsClassifier()
snapshot = FeatureSnapshot(dirpath=f"{args.out}/snapshot")  # embeds every training digit at the end of fit
trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[snapshot], logger=False, default_root_dir=args.out)
trainer.fit(model, datamodule=dm)

influence = InfluenceModule(
    model,
    train_dataset=dm.train_dataset,
    snapshot=f"{args.out}/snapshot",
    ihvp=LiSSA(damping=1.0, recursion_depth=300, batch_size=8),  # FastIF's tuned estimator
    num_candidates=100,  # kNN candidates per test point
    output_dir=f"{args.out}/influence",  # resumable, written shard by shard
)
test_points = Subset(dm.test_dataset, range(8))
trainer.predict(influence, DataLoader(test_points, batch_size=4), return_predictions=False)

result = influence.result  # positive = helpful, negative = harmful
for t in result.test_indices[:3].tolist():
    helpful, harmful = result.top_helpful(t, 3), result.top_harmful(t, 3)
    print(f"test {t}: helpful {helpful.indices.tolist()} {helpful.scores.tolist()}")
    print(f"         harmful {harmful.indices.tolist()} {harmful.scores.tolist()}")
print(result.to_pandas().head())
