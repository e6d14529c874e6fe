"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, built once per cache; and how the test
process ends."""

from __future__ import annotations

import atexit
import logging
import os
import sys

import pytest

# How the test process ends. CI has twice seen every test pass and then the process die of SIGSEGV with nothing
# printed, though `make test-all` keeps faulthandler on through exit (the learner's exit hook that tears down
# torch.distributed came from the first time). faulthandler reports a crash until Py_FinalizeEx unloads it, which
# it does before clearing the interpreter's thread states (CPython Python/pylifecycle.c, `_PyFaulthandler_Fini()`
# ahead of `finalize_interp_clear`); C++ static destructors run later still. So the crash is in native teardown of
# what the tests loaded into this one process (torch's and gloo's thread pools, Ray's core worker, vLLM). Once
# every Python exit hook has run, the process leaves with pytest's own status and skips that teardown. This hook is
# registered before anything here imports torch or Ray, and exit hooks run last-registered first, so theirs
# (ray.shutdown, the learner's) still run before it. It changes nothing for the product: the slow tests run
# `retrorl` itself in subprocesses and assert its exit status.
_PYTEST_PID = os.getpid()
_EXIT_STATUS: list[int] = []


@atexit.register
def _leave_before_native_teardown() -> None:
    if os.getpid() != _PYTEST_PID or not _EXIT_STATUS:  # a forked child, or pytest never finished its session
        return
    logging.shutdown()  # registered before this hook (pytest imports logging first), so it would run after it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    outcome = yield  # the outermost wrapper: every plugin's sessionfinish, the summary included, has run
    _EXIT_STATUS.append(int(session.exitstatus))
    return outcome


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from agents.model import TINY_MODEL, resolve_model  # here, not at the top: see the exit hook above

    return str(resolve_model(TINY_MODEL))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from agents.model import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def formatter(tokenizer):
    from agents.chat import ChatFormatter

    return ChatFormatter(tokenizer)
