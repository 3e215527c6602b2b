"""The Hydra application (``python -m lightning_fastif``): the job, its configs, report, plots, demo data/models.

Needs the ``app`` extra (scikit-learn, matplotlib, pandas) for the demo data and the plots.
"""
