"""benchmarks/_stamp.py: results JSONs name the commit, the dirt, the command and the machine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _stamp  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, env=env)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def _head_from_files(root: Path) -> str:
    """HEAD read from .git's files, not through `git rev-parse` (which the stamp uses)."""
    head = (root / ".git" / "HEAD").read_text().strip()
    assert head.startswith("ref: ")
    ref = head[len("ref: "):]
    loose = root / ".git" / ref
    if loose.exists():
        return loose.read_text().strip()
    for line in (root / ".git" / "packed-refs").read_text().splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    raise AssertionError(f"{ref} not found")


def test_clean_tree_names_its_commit(repo):
    src = _stamp.source(repo)
    assert src == {"commit": _head_from_files(repo), "dirty": False}
    assert len(src["commit"]) == 40


def test_changed_or_new_code_is_dirt_but_results_are_not(repo):
    # a rewritten results file is the run's own output: still clean
    (repo / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    (repo / "benchmarks" / "results" / "new.json").write_text("{}\n")
    assert _stamp.source(repo)["dirty"] is False
    # an edited tracked file and an untracked source file both change what runs
    (repo / "code.py").write_text("x = 2\n")
    (repo / "extra.py").write_text("y = 1\n")
    src = _stamp.source(repo)
    assert src["dirty"] is True
    assert src["dirty_paths"] == ["code.py", "extra.py"]
    # a new commit: clean again, and the stamp follows HEAD
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "two")
    src = _stamp.source(repo)
    assert src == {"commit": _head_from_files(repo), "dirty": False}


def test_not_a_checkout_says_so(tmp_path):
    src = _stamp.source(tmp_path)
    assert src["commit"] is None and src["dirty"] is None and src["git_error"]


def test_stamp_from_a_script_records_its_command_and_machine(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
                      "from _stamp import stamp\nprint(json.dumps(stamp()))\n")
    out = subprocess.run([sys.executable, str(script), "--steps", "3", "a b"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    st = json.loads(out)
    # the exact command, quoted so that a shell splits it back into the same words
    import shlex

    words = shlex.split(st["command"])
    assert words[1:] == [str(script), "--steps", "3", "a b"]
    assert os.path.basename(words[0]) == os.path.basename(sys.executable)
    assert st["cwd"] == str(tmp_path)  # outside the repository: the absolute folder
    assert st["commit"] == _head_from_files(REPO) if (REPO / ".git").is_dir() else st["commit"]
    m = st["machine"]
    assert m["cores"] == os.cpu_count() and m["cpu"]
    import torch

    assert m["torch"] == torch.__version__
    assert m["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    # the date is UTC ISO 8601
    import datetime

    date = datetime.datetime.fromisoformat(st["date"])
    assert date.utcoffset() == datetime.timedelta(0)
