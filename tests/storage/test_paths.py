import os

import pytest

from cairn.core.errors import UserInputError
from cairn.storage.paths import confined


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd", "..", "a\\..\\..\\b"])
def test_paths_that_escape_the_root_are_refused(tmp_path, bad):
    with pytest.raises(UserInputError, match="escape"):
        confined(tmp_path, bad)


def test_relative_paths_stay_inside(tmp_path):
    assert confined(tmp_path, "a/b c/ünï.txt") == tmp_path / "a" / "b c" / "ünï.txt"


def test_real_path_resolves_as_realpath_does(tmp_path, monkeypatch):
    """The two-system-call resolution gives what os.path.realpath gives: through symlinked folders
    (also before a '..'), for relative paths, files, and paths that do not exist (yet)."""
    from cairn.storage.paths import real_path

    real = tmp_path / "real" / "steps"
    real.mkdir(parents=True)
    (real / "train.py").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    for path in ["link/steps", str(tmp_path / "link" / "steps"), "link/steps/train.py", "link/steps/../steps",
                 "link/..", ".", "real/./steps/", "missing/deeper", "link/missing", "dangling", "dangling/below",
                 tmp_path / "link"]:
        assert real_path(path) == os.path.realpath(path), path
    assert real_path("link/steps") == str(real)
    assert real_path(b"link/steps") == str(real) and real_path(b"missing") == os.path.realpath("missing")  # str
