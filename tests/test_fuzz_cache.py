"""Property-based fuzzing (hypothesis) of the native entry points and the disk store, in a subprocess so that a
segfault or SIGBUS fails the test. Sized for CI (seconds); FREEZERT_FUZZ_EXAMPLES=5000 runs a longer campaign."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_fuzz_worker.py")
LONG = int(os.environ.get("FREEZERT_FUZZ_EXAMPLES", "0"))


def _fuzz(what: str, examples: int, tmp_path, env_extra: dict | None = None) -> None:
    n = LONG or examples
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    r = subprocess.run(
        [sys.executable, WORKER, what, str(n), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=None if LONG else 300,
    )
    if r.returncode < 0:
        pytest.fail(f"the {what} fuzzer died of signal {signal.Signals(-r.returncode).name}: {r.stderr[-3000:]}")
    assert r.returncode == 0 and r.stdout.strip() == f"ok {n}", r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("reference", [False, True], ids=["native", "no_native"])
def test_fuzz_codecs_native_vs_reference(reference, tmp_path):
    _fuzz("native", 100, tmp_path, {"FREEZERT_NO_NATIVE": "1"} if reference else None)


@pytest.mark.parametrize("reference", [False, True], ids=["native", "no_native"])
def test_fuzz_hash_views_vs_reference(reference, tmp_path):
    _fuzz("hash", 100, tmp_path, {"FREEZERT_NO_NATIVE": "1"} if reference else None)


def test_fuzz_disk_store_never_serves_a_wrong_row(tmp_path):
    _fuzz("disk", 40, tmp_path)


def test_a_crashing_fuzzer_fails_the_test(tmp_path, monkeypatch):
    """The harness itself: a worker killed by a signal is reported as a failure naming the signal."""
    monkeypatch.setattr(sys.modules[__name__], "WORKER", os.path.join(tmp_path, "die.py"))
    (tmp_path / "die.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    with pytest.raises(pytest.fail.Exception, match="signal SIGSEGV"):
        _fuzz("native", 1, tmp_path)
