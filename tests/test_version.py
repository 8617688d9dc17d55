"""code_version follows the package's Python files only; git_commit marks uncommitted code or configs."""

from __future__ import annotations

import re
import subprocess

import less_exp
from less_exp import version


def _package(root):
    (root / "less_exp" / "sub").mkdir(parents=True)
    (root / "less_exp" / "a.py").write_text("A = 1\n")
    (root / "less_exp" / "sub" / "b.py").write_text("B = 2\n")
    (root / "less_exp" / "README.md").write_text("notes\n")
    (root / "conf").mkdir()
    (root / "conf" / "eval.yaml").write_text("seed: 0\n")
    (root / "docs").mkdir()
    (root / "docs" / "page.md").write_text("# page\n")
    return root / "less_exp"


def test_code_version_changes_with_code_only(tmp_path, monkeypatch):
    monkeypatch.setattr(version, "PACKAGE_DIR", _package(tmp_path))
    first = version.code_version()
    assert re.fullmatch(re.escape(less_exp.__version__) + r"\+[0-9a-f]{12}", first)
    (tmp_path / "less_exp" / "README.md").write_text("other notes\n")
    (tmp_path / "conf" / "eval.yaml").write_text("seed: 1\n")
    assert version.code_version() == first
    (tmp_path / "less_exp" / "sub" / "b.py").write_text("B = 3\n")
    changed = version.code_version()
    assert changed != first
    (tmp_path / "less_exp" / "sub" / "b.py").rename(tmp_path / "less_exp" / "c.py")  # same bytes, moved
    assert version.code_version() not in (first, changed)


def test_the_real_package_has_a_code_version():
    assert version.code_version() == version.code_version()
    assert version.code_version().startswith(less_exp.__version__ + "+")


def test_git_commit_is_dirty_only_for_code_or_configs(tmp_path, monkeypatch):
    monkeypatch.setattr(version, "PACKAGE_DIR", _package(tmp_path).resolve())
    assert version.git_commit() is None  # not a checkout

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "--short", "HEAD")
    assert version.git_commit() == head
    (tmp_path / "docs" / "page.md").write_text("# regenerated\n")
    assert version.git_commit() == head
    (tmp_path / "conf" / "eval.yaml").write_text("seed: 1\n")
    assert version.git_commit() == head + "-dirty"
    git("commit", "-q", "-am", "seed")
    (tmp_path / "less_exp" / "new.py").write_text("")
    assert version.git_commit() == git("rev-parse", "--short", "HEAD") + "-dirty"
