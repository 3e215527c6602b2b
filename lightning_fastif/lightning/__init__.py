"""The Lightning layer: ``InfluenceModule`` (``trainer.predict``), the snapshot callbacks, ``ErrorCorrection``.

Reads snapshots through ``io``, asks ``search`` for candidates and ``core`` for gradients and inverse HVPs.
"""
