"""``python -m lightning_fastif`` runs the Hydra application (``lightning_fastif.app.main``)."""

from lightning_fastif.app.main import main

if __name__ == "__main__":
    main()
