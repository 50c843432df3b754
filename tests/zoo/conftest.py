"""The zoo: real architectures from torchvision, timm, Ultralytics and transformers, built from their configs with
random weights (nothing downloaded), checked against naive freezing in float64.

Locally a missing zoo package skips its file with the reason; CI sets ``FREEZERT_ZOO=require`` (``.ci/run``)
so that a missing package fails the run instead (``_conformance.need``). ``FREEZERT_ZOO_TABLE=docs/ZOO.md``
rewrites that page's table from the run (model x freeze: exact or not, eager blocks and why).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re

import pytest
import torch

from ._conformance import SCENARIOS, TABLE, Bases

BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"
FIRST = {
    "eval": "eval call (no_grad) first, then ",
    "inference": "eval call (inference_mode) first, then ",
    "plan-one": "fm.plan on one sample, then ",
}


def _versions() -> str:
    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "timm", "ultralytics", "transformers"))


def pytest_report_header(config):
    pkgs = _versions()
    return f"zoo: {pkgs}; FREEZERT_ZOO={os.environ.get('FREEZERT_ZOO', '(unset: a missing package skips)')}"


@pytest.fixture(scope="module", autouse=True)
def _free_bases():
    yield
    for bases in Bases.live:
        bases.models.clear()


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch-2 models at 32-64 px are too small for intra-op threads to pay, and on a loaded 2-core machine
    two spinning threads slow each step down many times over; the rest of the suite keeps its setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    row = TABLE.get(item.nodeid)
    if row is None or rep.when != "call":
        return
    row["outcome"] = rep.outcome
    crash = getattr(getattr(rep, "longrepr", None), "reprcrash", None)
    if hasattr(rep, "wasxfail"):  # marked xfail(strict=True) with the cause found
        row["outcome"], row["why"] = "xfailed", rep.wasxfail.removeprefix("reason: ")
    elif rep.failed and crash is not None:
        row["why"] = crash.message.splitlines()[0]
    elif rep.failed:  # XPASS(strict): the cause an xfail named is fixed
        row["why"] = str(rep.longrepr).splitlines()[0]


def _cell(text: str, width: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(text)).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table() -> str:
    lines = [
        "| suite | test | model | freeze | mode | cache | frozen params | eager blocks (why) | result |",
        "| --- | --- | --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for node, r in sorted(TABLE.items()):
        path, test = node.split("::", 1)
        suite = os.path.basename(path).removeprefix("test_").removesuffix(".py")
        opts = ", ".join(f"{k}={v!r}" for k, v in (r.get("opts") or {}).items())
        freeze = repr(r.get("freeze")) + (f" ({opts})" if opts else "")
        eager = "; ".join(f"`{b}`: {why}" for b, why in (r.get("eager") or {}).items()) or "none"
        if "frozen" not in r:
            eager = "(not reached)"
        outcome = r.get("outcome")
        kind = "xfail" if outcome == "xfailed" else "FAIL"
        result = "exact" if outcome == "passed" else f"{kind}: {r.get('why', outcome or '?')}"
        frozen = f"{100 * r['frozen']:.1f}%" if "frozen" in r else ""
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    suite,
                    f"`{test}`",
                    r.get("model", ""),
                    freeze,
                    FIRST.get(r.get("first"), "") + ("train" if r.get("train") else "eval"),
                    r.get("cache") or "",
                    frozen,
                    eager,
                    result,
                )
            )
            + " |"
        )
    return "\n".join(lines)


def _matrix() -> str:
    """The scenario tests (``Case.check``) as one row per model, one column per scenario and cache: exact, or xfail
    with a numbered cause; a dash where the scenario is left out (naive freezing itself cannot run it)."""
    cells: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    causes: list[str] = []
    for node, r in sorted(TABLE.items()):
        scenario = r.get("scenario")
        if scenario is None or "[" not in node:
            continue
        path, test = node.split("::", 1)
        suite = os.path.basename(path).removeprefix("test_").removesuffix(".py")
        func, param = test[: test.index("[")], test[test.index("[") + 1 : -1]
        cache = r.get("cache") or ""
        name = param
        for suffix in (f"-{cache}" if cache else "-no-cache", f"-{scenario}"):
            name = name.removesuffix(suffix)
        if not func.endswith("_from_every_start"):  # another test on the same cases: its own row
            name += f" ({func.removeprefix('test_').replace('_', ' ')})"
        outcome = r.get("outcome")
        if outcome == "passed":
            cell = "exact"
        else:
            why = r.get("why", outcome or "?")
            if why not in causes:
                causes.append(why)
            cell = f"{'xfail' if outcome == 'xfailed' else 'FAIL'} ({causes.index(why) + 1})"
        cells.setdefault((suite, name), {})[(scenario, cache)] = cell
    if not cells:
        return ""
    cols = [(sc, c) for sc in SCENARIOS for c in ("", "fp32")]
    lines = [
        "| suite | model | " + " | ".join(f"{sc}{' ' + c if c else ''}" for sc, c in cols) + " |",
        "| --- | --- |" + " --- |" * len(cols),
    ]
    for (suite, name), row in sorted(cells.items()):
        lines.append(f"| {suite} | {name} | " + " | ".join(row.get(col, "—") for col in cols) + " |")
    lines += ["", *(f"{i}. {_cell(why, 400)}" for i, why in enumerate(causes, 1))]
    return "\n".join(lines)


def _commit() -> str:
    """The freezert source the run used: its commit, and whether the work tree had changes."""
    import subprocess

    import freezert

    src = os.path.dirname(os.path.dirname(os.path.abspath(freezert.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "freezert"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "a freezert outside git"
    return f"commit {head}" + (" with uncommitted changes to freezert/" if dirty else "")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FREEZERT_ZOO_TABLE")
    if not path or not TABLE:
        return
    body = (
        f"{BEGIN}\n_Generated by `FREEZERT_ZOO_TABLE={path} python3 -m pytest tests/zoo` on {_commit()} "
        f"({_versions()})._\n\n"
    )
    matrix = _matrix()
    if matrix:
        body += "#### By model and scenario (the task files)\n\n" + matrix + "\n\n#### Every check\n\n"
    body += _table() + f"\n{END}"
    text = open(path).read() if os.path.exists(path) else f"# The zoo\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END) :]
    else:
        text += "\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)
