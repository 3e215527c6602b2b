"""Picklable models, data and snapshot writers for the InfluenceModule tests (ddp_spawn pickles all of them)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lightning_fastif.io.atomic import save_tensors, write_manifest
from lightning_fastif.io.snapshot_store import CHECKPOINTS_DIR, FEATURES_DIR, checkpoint_file, read_snapshot_manifest
from lightning_fastif.search.knn import KNNIndex


class TinyMLP(nn.Module):
    """``hidden`` (tanh) -> ``classifier``; float64; ``per_example_loss`` and ``features`` (the classifier's input)."""

    def __init__(self, dim: int = 4, hidden: int = 6, classes: int = 3, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, classes)
        self.double()

    def embed(self, x: Tensor) -> Tensor:
        return torch.tanh(self.hidden(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.drop(self.embed(x)))

    def per_example_loss(self, batch) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")

    def features(self, batch) -> Tensor:
        return self.embed(batch[0])


def blobs(n_train: int = 60, n_test: int = 6, dim: int = 4, classes: int = 3, seed: int = 0):
    """Gaussian blobs, float64 inputs and int64 labels: ``(train, test)`` TensorDatasets."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 2
    n = n_train + n_test
    y = torch.randint(classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def fit(model: nn.Module, data: TensorDataset, steps: int = 200, lr: float = 0.05, l2: float = 1e-3) -> nn.Module:
    """Full-batch Adam on the mean loss (+ L2), in place; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = data.tensors
    for _ in range(steps):
        opt.zero_grad()
        loss = model.per_example_loss(batch).mean() + l2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model.eval()


def train_features(model: nn.Module, data: Dataset) -> Tensor:
    with torch.no_grad():
        items = [data[i] for i in range(len(data))]
        if isinstance(items[0], dict):
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        else:
            batch = tuple(torch.stack([it[j] for it in items]) for j in range(len(items[0])))
        return model.features(batch).float()


def write_feature_snapshot(
    dirpath: Path,
    features: dict[str, Tensor] | Tensor,
    version: str = "epoch=0-step=0",
    step: int = 0,
    layer: str | None = None,
    hook: str | None = None,
) -> Path:
    """Write a features version in the layout FeatureSnapshot writes (one file per dataset, manifest entry)."""
    dirpath = Path(dirpath)
    if isinstance(features, Tensor):
        features = {"train": features}
    manifest = read_snapshot_manifest(dirpath, missing_ok=True)
    files = {}
    for name, feats in features.items():
        KNNIndex(feats.float(), backend="torch").save(dirpath / FEATURES_DIR / version, name)
        files[name] = {
            "file": f"{FEATURES_DIR}/{version}/{name}.safetensors",
            "index_file": None,
            "n": int(feats.shape[0]),
            "dim": int(feats.shape[1]),
        }
    first = next(iter(files.values()))
    manifest[FEATURES_DIR]["versions"][version] = {
        "epoch": 0,
        "global_step": step,
        "created": float(step),
        "n": first["n"],
        "dim": first["dim"],
        "metric": "l2",
        "index": "flat",
        "layer": layer,
        "hook": hook,
        "datasets": files,
    }
    manifest[FEATURES_DIR]["latest"] = version
    write_manifest(dirpath, manifest)
    return dirpath


def write_checkpoint(dirpath: Path, model: nn.Module, version: str, step: int) -> Path:
    """Write the model's state as a checkpoint version, as CheckpointSnapshot does."""
    dirpath = Path(dirpath)
    save_tensors(checkpoint_file(dirpath, version), dict(model.state_dict()))
    manifest = read_snapshot_manifest(dirpath, missing_ok=True)
    manifest[CHECKPOINTS_DIR]["versions"][version] = {
        "file": f"{CHECKPOINTS_DIR}/{version}.safetensors",
        "epoch": step,
        "global_step": step,
        "created": float(step),
    }
    manifest[CHECKPOINTS_DIR]["latest"] = version
    write_manifest(dirpath, manifest)
    return dirpath


class TinyText(nn.Module):
    """A transformer-like toy: token embedding, masked mean-pool, ``classifier``; dict batches with ``labels``."""

    def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)
        self.double()

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(self.embedding.weight.dtype).unsqueeze(-1)
        h = self.embedding(input_ids) * mask
        return self.norm(h.sum(1) / mask.sum(1).clamp_min(1.0))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classifier(self.pooled(input_ids, attention_mask))

    def per_example_loss(self, batch: dict) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    def features(self, batch: dict) -> Tensor:
        return self.pooled(batch["input_ids"], batch["attention_mask"])


class DictTexts(Dataset):
    """Random token sequences (length 6, some padding) whose label is whether token 3 occurs."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, 20, (n, 6), generator=g)
        lengths = torch.randint(3, 7, (n,), generator=g)
        self.attention_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
        self.input_ids = self.input_ids * self.attention_mask
        self.labels = ((self.input_ids == 3) & (self.attention_mask == 1)).any(1).long()

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class NotIndexable(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(3)


class CrashAfter(Exception):
    """Raised by CrashingModule to simulate a run killed midway."""


def crash_after(module, batches: int):
    """Make ``module`` raise after ``batches`` computed batches (a run killed midway)."""
    original = module._compute

    def compute(*args, **kwargs):
        if module.computed_batches >= batches:
            raise CrashAfter(f"killed after {batches} batches")
        return original(*args, **kwargs)

    module._compute = compute
    return module
