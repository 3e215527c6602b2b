"""The Hydra application's YAML configs, shipped as package data (``pkg://lightning_fastif.app.configs``).

An importable package, so an installed app finds them with no checkout: ``fastif.yaml`` is the primary config, and
each folder a config group whose options are ``_target_`` nodes holding exactly their class's constructor arguments.
"""
