"""Files on disk: atomic writes, the snapshot store (the one reader and writer of its layout) and results.

Imports neither Lightning nor Hydra.
"""
