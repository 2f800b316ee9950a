"""The tested stack cannot drift silently: tests/constraints.txt (what the README's test command and
.ci/run install) pins every package pyproject.toml names, inside its declared range, and a skip for
a package the extras promise fails the run under LOWBIT_REQUIRE_EXTRAS=1 (.ci/run sets it)."""

import importlib.util
import os
import subprocess
import sys

from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upgrades():
    spec = importlib.util.spec_from_file_location("lowbit_ci_upgrades", os.path.join(ROOT, ".ci", "upgrades.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_declared_package_is_pinned_inside_its_range():
    up = _upgrades()
    pins = up.pinned()
    for key, req in up.declared().items():
        assert key in pins, f"{req.name} is declared in pyproject.toml but not pinned in tests/constraints.txt"
        assert Version(pins[key]) in req.specifier, f"{req.name}=={pins[key]} is outside {req.specifier}"


def test_the_readme_test_command_installs_from_the_constraints():
    readme = open(os.path.join(ROOT, "README.md")).read()
    cmd = readme.split("<!-- test-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert "-c tests/constraints.txt" in cmd and '".[test,torch]"' in cmd, cmd
    assert "LOWBIT_REQUIRE_EXTRAS=1" in open(os.path.join(ROOT, ".ci", "run")).read()


_SKIPPING = """
import pytest
def test_needs_a_missing_package():
    pytest.importorskip("lowbit_no_such_package")
def test_skips_for_another_reason():
    pytest.skip("the hub is reachable from this machine")
"""


def test_a_skip_for_a_missing_package_fails_when_the_extras_are_required(tmp_path):
    (tmp_path / "test_skipping.py").write_text(_SKIPPING)

    def run(required):
        env = {k: v for k, v in os.environ.items() if k != "LOWBIT_REQUIRE_EXTRAS"}
        if required:
            env["LOWBIT_REQUIRE_EXTRAS"] = "1"
        env["PYTHONPATH"] = os.path.join(ROOT, "tests")
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               "-o", "addopts=", str(tmp_path / "test_skipping.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    free = run(False)
    assert free.returncode == 0 and "2 skipped" in free.stdout, free.stdout[-2000:]
    strict = run(True)
    assert strict.returncode == 1 and "1 failed, 1 skipped" in strict.stdout, strict.stdout[-2000:]
    assert "lowbit_no_such_package" in strict.stdout
