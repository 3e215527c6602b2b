"""lightning_fastif: fast influence functions (FastIF) for PyTorch Lightning.

Sign convention, stated once for the whole package: ``score = g_testᵀ (H + λI)⁻¹ g_train`` and **positive means
helpful**: removing a training point with a positive score from the ``n`` training points would raise the test
loss by about ``score / n``.
"""

from lightning_fastif.batches import IndexedData
from lightning_fastif.correction import ErrorCorrection, compare_selections, correct_errors
from lightning_fastif.features import extract_features, features_of_batch
from lightning_fastif.grads import FunctionalLoss, evaluating, per_example_gradients
from lightning_fastif.hessian import HessianOperator
from lightning_fastif.ihvp import (
    ConjugateGradient,
    ExactInverse,
    Identity,
    InverseHVP,
    LiSSA,
    LiSSADivergenceError,
    relative_residual,
)
from lightning_fastif.influence import influence_scores, inverse_hvp_of_test, score_candidates, self_influence
from lightning_fastif.knn import KNNIndex, knn_recall
from lightning_fastif.memory import MemoryBudgetError, measure_stage, parse_memory
from lightning_fastif.module import CandidatePool, InfluenceModule
from lightning_fastif.params import select_parameters
from lightning_fastif.results import BatchInfluence, InfluenceResult
from lightning_fastif.snapshots import CheckpointSnapshot, FeatureSnapshot
from lightning_fastif.storage import SnapshotError, SnapshotNotFoundError, apply_checkpoint, load_checkpoint
from lightning_fastif.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "BatchInfluence",
    "CandidatePool",
    "CheckpointSnapshot",
    "ConjugateGradient",
    "ErrorCorrection",
    "FeatureSnapshot",
    "InfluenceModule",
    "InfluenceResult",
    "KNNIndex",
    "MemoryBudgetError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "VerifyReport",
    "apply_checkpoint",
    "compare_selections",
    "correct_errors",
    "extract_features",
    "features_of_batch",
    "knn_recall",
    "load_checkpoint",
    "measure_stage",
    "parse_memory",
    "ExactInverse",
    "FunctionalLoss",
    "HessianOperator",
    "Identity",
    "IndexedData",
    "InverseHVP",
    "LiSSA",
    "LiSSADivergenceError",
    "evaluating",
    "influence_scores",
    "inverse_hvp_of_test",
    "per_example_gradients",
    "relative_residual",
    "score_candidates",
    "select_parameters",
    "self_influence",
    "verify",
]
