from cairn.core import ids
from cairn.core.digests import digest_json
from cairn.core.spec import Argument, GraphSpec, InputSpec, OutputSpec, StepSpec
from cairn.core.status import Status, can_move


def test_state_machine():
    assert can_move(Status.QUEUED, Status.RUNNING)
    assert can_move(Status.RUNNING, Status.FAILED)
    assert not can_move(Status.COMPLETED, Status.RUNNING)
    assert not can_move(Status.NOT_STARTED, Status.COMPLETED)
    assert Status.REUSED.is_success and Status.CANCELED.is_terminal


def test_graph_spec_round_trips_through_json():
    step = StepSpec(name="train", script_name="train.py", source_directory="/src", snapshot="blake2b:00",
                    arguments=(Argument(literal="--data"), Argument(input="prepped")),
                    inputs=(InputSpec("prepped", "prep", "prepped"),), outputs=(OutputSpec("model", "ds"),),
                    params=(("alpha", "0.1"),), run_after=("prep",))
    spec = GraphSpec((step,))
    again = GraphSpec.from_json(spec.to_json())
    assert again == spec
    assert again.steps[0].argument_template() == ["--data", "{input:prepped}"]
    assert again.downstream("prep") == ["train"] and step.upstream() == {"prep"}


def test_a_spec_read_back_shares_its_equal_arguments_and_equals_what_was_written():
    steps = tuple(StepSpec(name=f"s{i}", script_name="a.py", source_directory="src", snapshot="blake2b:1",
                           arguments=(Argument(literal="--in"), Argument(input=f"x{i}"), Argument(literal="--in")))
                  for i in range(3))
    read = GraphSpec.from_json(GraphSpec(steps=steps).to_json())
    assert read == GraphSpec(steps=steps)
    firsts = [s.arguments[0] for s in read.steps] + [s.arguments[2] for s in read.steps]
    assert all(a is firsts[0] for a in firsts)  # one "--in" for every step
    assert [s.arguments[1].input for s in read.steps] == ["x0", "x1", "x2"]


def test_ids_sort_by_time_and_digests_are_canonical():
    a = ids.new_id("run")
    b = ids.new_id("run")
    assert ids.is_valid_id(a) and a[:13] <= b[:13]
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})


def test_output_digests_are_xxh3_of_the_bytes(tmp_path):
    """Whatever the buffer size, the digest is XXH3-128 of the whole file (reuse keys depend on it)."""
    import os

    import xxhash

    from cairn.core import digests

    for size in (0, 1, (256 << 10) - 1, 256 << 10, (256 << 10) * 3 + 17,
                 digests._OVERLAP_FROM, digests._OVERLAP_FROM + 3 * digests._OVERLAP_CHUNK + 5):  # read by a 2nd thread
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert digests.content_digest_file(path) == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
        path.unlink()


def test_a_read_error_while_digesting_a_large_file_is_raised(tmp_path, monkeypatch) -> None:
    """The thread reading ahead hands its error to the caller (no digest of half a file)."""
    import io

    import pytest

    from cairn.core import digests

    path = tmp_path / "big"
    path.write_bytes(b"x" * (digests._OVERLAP_FROM + 10))

    class FailingFile(io.FileIO):  # the third read fails, as a disk error would
        reads = 0

        def readinto(self, buffer):  # type: ignore[override]
            FailingFile.reads += 1
            if FailingFile.reads == 3:
                raise OSError(5, "Input/output error")
            return super().readinto(buffer)

    monkeypatch.setattr(digests, "open", lambda p, *_a, **_k: FailingFile(p, "rb"), raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        digests.content_digest_file(path)


def test_files_changed_too_recently_for_their_stat_to_tell_an_edit(monkeypatch) -> None:
    """The change time decides (tar and touch -d cannot put it ahead); a whole-second mtime is taken
    for a filesystem clock of seconds (FAT's 2 s), other clocks move with the kernel's tick
    (<= 10 ms); $CAIRN_FS_TICK_SECONDS says the tick instead."""
    from types import SimpleNamespace

    from cairn.core import digests
    from cairn.core.digests import changed_too_recently

    whole = 1_700_000_000 * 10**9
    on_fat = SimpleNamespace(st_mtime_ns=whole, st_ctime_ns=whole)
    assert changed_too_recently(on_fat, whole + 1_900_000_000)
    assert not changed_too_recently(on_fat, whole + 2_000_000_000)
    fine = SimpleNamespace(st_mtime_ns=whole + 123_456_789, st_ctime_ns=whole + 123_456_789)
    assert changed_too_recently(fine, fine.st_ctime_ns + 15_000_000)
    assert not changed_too_recently(fine, fine.st_ctime_ns + 20_000_000)
    ahead = SimpleNamespace(st_mtime_ns=whole + 10**12 + 1, st_ctime_ns=whole)  # mtime set ahead, by tar
    assert not changed_too_recently(ahead, whole + 30_000_000)
    assert changed_too_recently(fine, fine.st_ctime_ns - 5 * 10**9)  # changed "in the future": a clock set back
    monkeypatch.setattr(digests, "_FS_TICK_NS", 10**9)
    assert changed_too_recently(fine, fine.st_ctime_ns + 900_000_000)


def test_a_filesystem_tick_that_is_not_a_number_is_said_and_ignored(monkeypatch) -> None:
    import pytest

    from cairn.core import digests

    monkeypatch.setenv("CAIRN_FS_TICK_SECONDS", "2s")
    with pytest.warns(UserWarning, match="CAIRN_FS_TICK_SECONDS='2s' is not a number of seconds"):
        assert digests._fs_tick_ns() is None
    monkeypatch.setenv("CAIRN_FS_TICK_SECONDS", "0.5")
    assert digests._fs_tick_ns() == 500_000_000
