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


def test_ids_sort_by_time_and_digests_are_canonical():
    a = ids.new_id("run")
    b = ids.new_id("run")
    assert ids.is_valid_id(a) and a[:13] <= b[:13]
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})


def test_output_digests_do_not_depend_on_how_the_file_is_read(tmp_path, monkeypatch):
    """Large files are hashed through a mapping, small ones read: the digest is XXH3-128 of the
    bytes either way, so reuse keys survive the switch."""
    import os

    import xxhash

    from cairn.core import digests

    data = os.urandom(1 << 20) * 5 + b"tail"  # over the mapping threshold
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    expected = "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    assert digests.content_digest_file(big) == expected
    monkeypatch.setattr(digests, "_MAP_AT_LEAST", 1 << 40)  # the reading path
    assert digests.content_digest_file(big) == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    monkeypatch.setattr(digests, "_MAP_AT_LEAST", 0)  # an empty file cannot be mapped: it is read
    assert digests.content_digest_file(empty) == "xxh3-128:" + xxhash.xxh3_128(b"").hexdigest()
