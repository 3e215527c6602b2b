"""lightning_fastif: fast influence functions (FastIF) for PyTorch Lightning.

Sign convention, stated once for the whole package: ``score = g_testᵀ (H + λI)⁻¹ g_train`` and **positive means
helpful**: removing a training point with a positive score from the ``n`` training points would raise the test
loss by about ``score / n``.
"""

from lightning_fastif._moved import install as _install_moved_modules
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.curvature import KFACFactors, fit_kfac
from lightning_fastif.core.ekfac import EKFAC
from lightning_fastif.core.grads import FunctionalLoss, evaluating, per_example_gradients
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import (
    AutoInverse,
    ConjugateGradient,
    ConvergenceError,
    ExactInverse,
    Identity,
    InverseHVP,
    LiSSA,
    relative_residual,
)
from lightning_fastif.core.influence import influence_scores, inverse_hvp_of_test, score_candidates, self_influence
from lightning_fastif.core.memory import measure_stage, parse_memory
from lightning_fastif.core.params import select_parameters
from lightning_fastif.core.verify import VerifyReport, verify
from lightning_fastif.errors import (
    ArgumentError,
    LiSSADivergenceError,
    MemoryBudgetError,
    NonFiniteError,
    SnapshotError,
    SnapshotNotFoundError,
)
from lightning_fastif.io.results import BatchInfluence, InfluenceResult
from lightning_fastif.io.snapshot_store import apply_checkpoint, load_checkpoint
from lightning_fastif.lightning.arguments import ComputeArguments, CorrectionArguments, SearchArguments
from lightning_fastif.lightning.correction import ErrorCorrection, compare_selections, correct_errors
from lightning_fastif.lightning.module import CandidatePool, InfluenceModule
from lightning_fastif.lightning.snapshots import CheckpointSnapshot, CurvatureSnapshot, FeatureSnapshot
from lightning_fastif.metrics import knn_recall
from lightning_fastif.search.features import extract_features, features_of_batch
from lightning_fastif.search.knn import KNNIndex

_install_moved_modules()

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "AutoInverse",
    "ConvergenceError",
    "NonFiniteError",
    "BatchInfluence",
    "CandidatePool",
    "CheckpointSnapshot",
    "CurvatureSnapshot",
    "ComputeArguments",
    "CorrectionArguments",
    "ConjugateGradient",
    "EKFAC",
    "KFACFactors",
    "fit_kfac",
    "ErrorCorrection",
    "FeatureSnapshot",
    "InfluenceModule",
    "InfluenceResult",
    "KNNIndex",
    "MemoryBudgetError",
    "SearchArguments",
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
