#!/usr/bin/env python3
"""Deliberate upgrades of the tested stack (tests/constraints.txt, the upper bounds in pyproject.toml).

    python .ci/upgrades.py                      # newer releases of the packages lowbit names
    python .ci/upgrades.py --strict             # ... and exit 1 when there is one
    python .ci/upgrades.py --try transformers==5.26.0 [-- PYTEST ARGS]
                                                # fresh venv: the tested stack, then that release on
                                                # top; runs the suite (default: -m "not gpu")
    python .ci/upgrades.py --freeze             # write tests/constraints.txt from this interpreter's
                                                # environment (after the suite passed in it)

Releases are read with ``pip index versions`` (the index pip is configured with). Pre-releases are
ignored. After a passing ``--try``, raise the bound in pyproject.toml and refreeze from that venv.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "tests", "constraints.txt")
EXTRAS = ("test", "torch")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, Requirement]:
    """The packages pyproject.toml names (dependencies and the tested extras), by normalized name."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"]) + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    out: dict[str, Requirement] = {}
    for text in reqs:
        req = Requirement(text)
        if _norm(req.name) in out:  # a package named twice: both ranges apply
            req = Requirement(f"{req.name}{out[_norm(req.name)].specifier & req.specifier}")
        out[_norm(req.name)] = req
    return out


def pinned() -> dict[str, str]:
    pins = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, ver = line.partition("==")
                pins[_norm(name)] = ver.strip()
    return pins


def latest(name: str) -> Version | None:
    r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    m = re.search(r"Available versions: (.+)", r.stdout)
    if not m:
        return None
    versions = []
    for v in m.group(1).split(","):
        try:
            versions.append(Version(v.strip()))
        except InvalidVersion:
            continue
    final = [v for v in versions if not v.is_prerelease]
    return max(final) if final else None


def report(strict: bool) -> int:
    pins, newer = pinned(), 0
    print(f"{'package':<20} {'tested':<14} {'newest':<14} range in pyproject.toml")
    for key, req in sorted(declared().items()):
        tested = pins.get(key, "-")
        new = latest(req.name)
        flag = ""
        if new is not None and tested != "-" and new > Version(tested.split("+")[0]):
            newer += 1
            flag = "  <- newer" + ("" if new in req.specifier else " (outside the range)")
        print(f"{req.name:<20} {tested:<14} {str(new or '?'):<14} {req.specifier or '(any)'}{flag}")
    print(f"{newer} package(s) have a release newer than the tested one")
    return 1 if strict and newer else 0


def try_release(spec: str, pytest_args: list[str]) -> int:
    req = Requirement(spec)
    with tempfile.TemporaryDirectory(prefix="lowbit-upgrade-") as tmp:
        venv = os.path.join(tmp, "venv")
        py = os.path.join(venv, "bin", "python")
        steps = [[sys.executable, "-m", "venv", venv],
                 [py, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "-e", f"{ROOT}[{','.join(EXTRAS)}]"],
                 # the release on top: its own dependencies may move, the rest of the stack stays
                 [py, "-m", "pip", "install", "-q", str(req)],
                 [py, "-m", "pip", "check"],
                 [os.path.join(venv, "bin", "pytest"), *(pytest_args or ["-m", "not gpu"])]]
        for cmd in steps:
            print("+", " ".join(cmd), flush=True)
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc and cmd[-1] != "check":  # pip check reports the bound it breaks; the suite decides
                print(f"upgrades: {spec}: step failed (exit {rc}): {' '.join(cmd[:4])} ...", file=sys.stderr)
                return rc
    print(f"upgrades: the suite passed with {spec}")
    return 0


def freeze() -> int:
    r = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                       text=True, check=True)
    lines = sorted((re.sub(r"\+[\w.]+$", "", ln) for ln in r.stdout.splitlines()
                    if "==" in ln and not ln.startswith("#")), key=str.lower)
    with open(CONSTRAINTS) as f:
        header = [ln for ln in f.read().splitlines() if ln.startswith("#")]
    tmp = CONSTRAINTS + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    os.replace(tmp, CONSTRAINTS)
    print(f"upgrades: wrote {len(lines)} pins to {os.path.relpath(CONSTRAINTS, ROOT)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a newer release exists")
    ap.add_argument("--try", dest="spec", help="NAME==VERSION: run the suite with that release in a fresh venv")
    ap.add_argument("--freeze", action="store_true", help="write tests/constraints.txt from this environment")
    args = ap.parse_args(argv)
    if args.freeze:
        return freeze()
    if args.spec:
        return try_release(args.spec, rest)
    return report(args.strict)


if __name__ == "__main__":
    sys.exit(main())
