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


def test_output_digests_are_xxh3_of_the_bytes(tmp_path):
    """Whatever the buffer size, the digest is XXH3-128 of the whole file (reuse keys depend on it)."""
    import os

    import xxhash

    from cairn.core import digests

    for size in (0, 1, (256 << 10) - 1, 256 << 10, (256 << 10) * 3 + 17):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert digests.content_digest_file(path) == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
