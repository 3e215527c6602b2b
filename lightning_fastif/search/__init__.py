"""Candidate search: features of examples (``features``) and the kNN index over them (``knn``).

Imports the engine (``core``) and the on-disk layer (``io``); FAISS is optional and detected once in ``knn``.
"""
