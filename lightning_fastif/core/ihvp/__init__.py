"""Inverse Hessian-vector products: ``x = (H + λI)⁻¹ v`` for a batch of vectors, behind one small interface.

``damping`` is the same λ for every estimator. Each estimator takes a
:class:`~lightning_fastif.HessianOperator` and ``V`` vectors ``[V, P]`` and returns ``[V, P]``; after a call,
``estimator.diagnostics`` holds what it did: settings as used, iterations, seconds, and the certificate
(``converged``: the relative residual ``‖(H + λI)x − v‖ / ‖v‖`` is at most ``tol`` over ``residual_examples``
training examples; ``residual_from`` says whether this solve or the first one of the same system measured it).

=========================  ==============================================  =======================================
estimator                  cost                                            use it for
=========================  ==============================================  =======================================
:class:`Identity`          nothing (``x = v``)                             TracIn-style gradient dot products
:class:`ExactInverse`      ``P`` full-data HVPs + a ``P×P`` factorisation  ground truth, ``P`` up to a few thousand
                           once per weights
:class:`ConjugateGradient` one full-data HVP per iteration                 exact answers for mid-size ``P``;
                                                                           ``preconditioner="ekfac"``: far fewer
                                                                           iterations
:class:`LiSSA`             ``depth × repeats`` minibatch HVPs              FastIF's tunable estimator, any size;
                                                                           ``preconditioner="ekfac"``: the series
                                                                           on the EK-FAC-preconditioned system
:class:`AutoInverse`       the exact solve where it fits, else             the default
                           EK-FAC-preconditioned CG (a factored layer
                           selected), else LiSSA
=========================  ==============================================  =======================================

Modules: :mod:`~lightning_fastif.core.ihvp.base` (the interface, certification, the per-system cache),
:mod:`~lightning_fastif.core.ihvp.direct` (Identity, ExactInverse, ConjugateGradient),
:mod:`~lightning_fastif.core.ihvp.lissa`, :mod:`~lightning_fastif.core.ihvp.auto` and
:mod:`~lightning_fastif.core.ihvp.factored` (K-FAC / EK-FAC factors fitted once per system, or handed over by
:meth:`InverseHVP.use_factors`: the caller is responsible for them matching the weights) and
:mod:`~lightning_fastif.core.ihvp.ordered` (CG's full-data products over size-ordered chunks, converged rows left
out).
"""

from lightning_fastif.core.ihvp.auto import AutoInverse
from lightning_fastif.core.ihvp.base import (
    ConvergenceError,
    InverseHVP,
    SystemCache,
    lowest_eigenvalue,
    relative_residual,
    suggest_damping,
)
from lightning_fastif.core.ihvp.direct import ConjugateGradient, ExactInverse, Identity
from lightning_fastif.core.ihvp.lissa import LiSSA
from lightning_fastif.errors import LiSSADivergenceError

__all__ = [
    "AutoInverse",
    "ConjugateGradient",
    "ConvergenceError",
    "ExactInverse",
    "Identity",
    "InverseHVP",
    "LiSSA",
    "LiSSADivergenceError",
    "SystemCache",
    "lowest_eigenvalue",
    "relative_residual",
    "suggest_damping",
]
