import pytest

from cairn.core.errors import UserInputError
from cairn.storage.paths import confined


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd", "..", "a\\..\\..\\b"])
def test_paths_that_escape_the_root_are_refused(tmp_path, bad):
    with pytest.raises(UserInputError, match="escape"):
        confined(tmp_path, bad)


def test_relative_paths_stay_inside(tmp_path):
    assert confined(tmp_path, "a/b c/ünï.txt") == tmp_path / "a" / "b c" / "ünï.txt"
