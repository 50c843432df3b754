"""A per-test time limit without pytest-timeout: ``-p pytest_deadline``, ``FREEZERT_TEST_TIMEOUT`` seconds (120).

``gpu_run.sh`` loads it (with ``benchmarks/`` on ``PYTHONPATH``) where pytest-timeout is not installed. SIGALRM
interrupts Python code only: a kernel hung inside C is left to the script's outer ``timeout``.
"""

import os
import signal

import pytest

LIMIT = int(os.environ.get("FREEZERT_TEST_TIMEOUT", "120"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past {LIMIT} s (FREEZERT_TEST_TIMEOUT)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT)  # setup, call and teardown together
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
