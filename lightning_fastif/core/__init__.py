"""The engine, in pure torch: no Lightning, Hydra or FAISS is imported anywhere under this folder.

Parameters (``params``), batches (``batches``), per-example gradients and JVP scores (``grads``), Hessian-vector
products (``hessian``), inverse-HVP estimators (``ihvp``), influence and self-influence scores (``influence``),
memory budgets (``memory``) and the check against exact influence (``verify``).
"""
