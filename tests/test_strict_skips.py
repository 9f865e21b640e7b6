"""Strict skips (tests/conftest.py): a skip not listed in ALLOWED_SKIPS fails the run; listed ones, xfails and
--no-strict-skips runs do not."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _suite(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tests / "conftest.py")
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\nstrict_skips = true\n')
    (tests / "test_gpu.py").write_text("import pytest\n\n\ndef test_kernel():\n    pytest.skip('needs a CUDA GPU')\n")
    (tests / "test_other.py").write_text(
        "import pytest\n\n\ndef test_passes():\n    pass\n\n\ndef test_skips():\n    pytest.skip('no data here')\n\n\n"
        "@pytest.mark.xfail(reason='known', strict=True)\ndef test_xfails():\n    assert False\n")


def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("QCJAX_STRICT_SKIPS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_an_unlisted_skip_fails_and_a_listed_one_does_not(tmp_path):
    _suite(tmp_path)
    out = _run(tmp_path)
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in out.stdout.strip().splitlines()[-1], out.stdout
    assert "skipped (no data here) under strict skips" in out.stdout and "ALLOWED_SKIPS" in out.stdout
    off = _run(tmp_path, "--no-strict-skips")
    assert off.returncode == 0 and "1 passed, 2 skipped, 1 xfailed" in off.stdout.strip().splitlines()[-1], off.stdout


def test_a_module_skipped_at_import_is_a_collection_error(tmp_path):
    """pytest.importorskip at module level (a missing dependency) stops the run, naming the module."""
    _suite(tmp_path)
    (tmp_path / "tests" / "test_missing_dep.py").write_text("import pytest\n\npytest.importorskip('no_such_qcjax')\n")
    out = _run(tmp_path)
    assert out.returncode == 2, out.stdout
    assert "ERROR tests/test_missing_dep.py" in out.stdout and "could not import 'no_such_qcjax'" in out.stdout
    assert _run(tmp_path, "--no-strict-skips").returncode == 0
