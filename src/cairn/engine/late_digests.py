"""Large outputs digested after their step was committed (the agent's local compute), so that
nothing of the run waits for the digest: the step's every consumer in the run could start before
it (``PipelineScheduler.digest_may_come_late``), and a step with no consumer in the run has nobody
to wait for it.

Until the digest comes, the output's record carries ``pending_digest(step run)``; no step reuses
the output before its digest is made (the scheduler asks for it, ``LateDigests.request``, and
prepares the step again once it is: the agent's loop never waits for a digest). A consumer that
committed meanwhile is recorded without a fingerprint, and gets it, with its cache entry, when the
digests it waits for come: until then it is never reused, never wrongly reused. Whoever needs a
digest still pending and finds nobody making it (a later agent, after the one that committed the
step died, in a thread; a ``cairn debug`` shell) digests the output where it is, first checking
that it did not change since it was committed. An output that did change is recorded as
``changed:``: no fingerprint names it, and its step is not reused."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cairn.engine.fingerprint import definition_of, fingerprint, fingerprint_parts, input_digests
from cairn.runner.job import CHANGED, StepJob, pending_digest, pending_owner
from cairn.store import queries as q
from cairn.store.db import Store


def digest_in_place(row: dict[str, Any], root: str) -> str:
    """The digest of a committed output (``row``, on a local datastore at ``root``) where it is, or
    ``CHANGED`` + the step run's id when it changed (or went) since it was committed."""
    from cairn.storage.tree import digest_tree

    changed = CHANGED + (pending_owner(row["digest"]) or "")
    try:
        tree = digest_tree(os.path.join(root, row["path"]))
    except FileNotFoundError:
        return changed
    return tree.digest if tree.stat_signature == row.get("stat_signature") else changed


def resolved(store: Store, row: dict[str, Any], root: str | None) -> str:
    """The digest of a committed output whose record (``row``) may say pending: read from the store
    when it was made meanwhile, else made here, where it is (``root``: its local datastore's), and
    recorded: for a process with no agent's digests in flight (``cairn debug``). None for ``root``:
    its datastore is no longer a local one here, so nothing can be read: ``CHANGED`` (for this
    caller only: nothing is recorded)."""
    owner = pending_owner(row["digest"])
    if owner is None:
        return row["digest"]
    now = q.get_outputs(store, owner).get(row["name"])
    if now is not None and not pending_owner(now["digest"]):
        return now["digest"]
    if root is None:
        return CHANGED + owner
    made = digest_in_place(row, root)
    q.record_late_digests(store, owner, pending_digest(owner), {row["name"]: made},
                          forget_cache_entry=made.startswith(CHANGED))
    return made


class DigestPending(Exception):
    """A digest a step needs is being made by the agent: the step is prepared again once it is
    (the agent's loop does not wait for it)."""


class OutputChanged(Exception):
    """A step's input changed after its producer committed it, before it was digested."""


class LateDigests:
    """The agent's digests in flight, and the consumers whose fingerprints wait for them. Nothing
    here blocks the agent's loop: ``request`` says a digest is pending, and ``on_made(step run)``
    follows each one made."""

    def __init__(self, store: Store, on_change: Callable[[str], None] = lambda step_run_id: None,
                 on_made: Callable[[str], None] = lambda step_run_id: None) -> None:
        self._store = store
        self._on_change = on_change
        self._on_made = on_made
        self._changed = threading.Condition()
        self._running: set[str] = set()  # step runs whose digests are being made (or promised: see promise)
        # of those, the ones made (the store has them, or this agent does) or given up: none waits on them
        self._recorded: set[str] = set()
        self._waiting: dict[str, list[StepJob]] = {}  # producer step run -> consumers whose fingerprint waits
        self._adopting: set[str] = set()  # of those, the ones whose step ran elsewhere (an agent that died)
        # (step run, output) -> a digest made here that the store refused: given from here meanwhile
        self._unrecorded: dict[tuple[str, str], str] = {}

    def promise(self, step_run_id: str) -> None:
        """That step is about to commit outputs before their digests (``start`` follows, or ``drop``
        if it is not committed after all): nobody else makes those digests meanwhile."""
        with self._changed:
            self._running.add(step_run_id)

    def drop(self, step_run_id: str) -> None:
        """A promise not kept: the step was not committed."""
        self._finish(step_run_id)

    def start(self, job: StepJob, outputs: list[dict[str, Any]],
              digest: Callable[[], dict[str, str]], settle: Callable[[dict[str, str] | None, str | None], None]
              ) -> None:
        """``job`` committed ``outputs`` with pending digests: ``digest()`` makes them (raising when
        one changed), in a thread of its own; ``settle(digests, failure)`` follows."""
        pending = [o["name"] for o in outputs if pending_owner(o["digest"])]
        self._run(job.step_run_id, lambda: self._digest(job, pending, digest, settle))

    def _run(self, step_run_id: str, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work, name=f"digest-{step_run_id}", daemon=True)
        with self._changed:
            self._running.add(step_run_id)
        try:
            thread.start()
        except BaseException:  # (no thread to be had) left pending, for whoever needs it next
            self._finish(step_run_id)
            raise

    def _digest(self, job: StepJob, pending: list[str], digest: Callable[[], dict[str, str]],
                settle: Callable[[dict[str, str] | None, str | None], None]) -> None:
        digests: dict[str, str] | None = None
        failure: str | None = None
        try:
            try:
                digests = digest()
                made = {name: digests[name] for name in pending}
            except Exception as exc:  # changed after its commit (or unreadable): keyed by nothing
                failure = str(exc) or type(exc).__name__
                made = dict.fromkeys(pending, CHANGED + job.step_run_id)
            self._record(job.step_run_id, made)
            settle(digests, failure)
        finally:
            self._finish(job.step_run_id)

    def _record(self, owner: str, made: dict[str, str]) -> None:
        """Record digests made here; kept here when the store refuses them (given from here, and
        recorded again when asked for)."""
        try:
            q.record_late_digests(self._store, owner, pending_digest(owner), made,
                                  forget_cache_entry=any(d.startswith(CHANGED) for d in made.values()))
        except Exception:
            with self._changed:
                self._unrecorded.update({(owner, name): digest for name, digest in made.items()})
        with self._changed:
            self._recorded.add(owner)  # a consumer keyed from now on finds them (store, or here)

    def _finish(self, step_run_id: str) -> None:
        """Its consumers are keyed before anyone waiting for the digest goes on (a rerun then finds
        their cache entries); none waits on it again (made or not: a digest never made here is lost
        to them)."""
        with self._changed:
            self._recorded.add(step_run_id)
        while True:
            with self._changed:
                waiting = self._waiting.pop(step_run_id, [])
                if not waiting:
                    self._running.discard(step_run_id)
                    self._recorded.discard(step_run_id)
                    self._adopting.discard(step_run_id)
                    self._changed.notify_all()
                    break
            for consumer in waiting:
                self.fingerprint_later(consumer)
        self._on_made(step_run_id)
        self._on_change(step_run_id)

    def _known(self, owner: str, output: str) -> str | None:
        """The digest made of that output: from here (made, the store refused it: recorded again
        now, if it can be), or from the store; None while it is pending; ``CHANGED`` for an output
        the store no longer has."""
        with self._changed:
            made = self._unrecorded.get((owner, output))
        if made is not None:
            try:
                q.record_late_digests(self._store, owner, pending_digest(owner), {output: made},
                                      forget_cache_entry=made.startswith(CHANGED))
                with self._changed:
                    self._unrecorded.pop((owner, output), None)
            except Exception:
                pass
            return made
        row = q.get_outputs(self._store, owner).get(output)
        if row is None:
            return CHANGED + owner
        return None if pending_owner(row["digest"]) else row["digest"]

    def live(self, step_run_id: str) -> bool:
        """Whether this agent's own step commits (or committed) that step run's outputs before their
        digests, which it makes now: its consumers in the run may start with them pending."""
        with self._changed:
            return step_run_id in self._running and step_run_id not in self._adopting

    def request(self, row: dict[str, Any], root: str | None) -> str:
        """The digest of a committed output whose record (``row``) may say pending: known (the
        store's, or made here); else being made (by the step that committed it, or here, in a
        thread: an agent that died left it), and ``DigestPending`` is raised (``on_made``
        follows). None for ``root``: as ``resolved``."""
        owner = pending_owner(row["digest"])
        if owner is None:
            return row["digest"]
        with self._changed:
            if owner in self._running:
                raise DigestPending(owner)
        known = self._known(owner, row["name"])
        if known is not None:
            return known
        if root is None:
            return CHANGED + owner
        with self._changed:
            if owner in self._running:  # (started meanwhile)
                raise DigestPending(owner)
            self._running.add(owner)
            self._adopting.add(owner)
        try:
            self._run(owner, lambda: self._adopt(owner, row, root))
        except RuntimeError:  # no thread to be had: made here and now, the loop waiting for it
            return resolved(self._store, row, root)
        raise DigestPending(owner)

    def _adopt(self, owner: str, row: dict[str, Any], root: str) -> None:
        """Make the pending digests of ``owner``'s outputs on that output's datastore, where they are
        (one that cannot be read is recorded changed: keyed by nothing)."""
        try:
            rows = [own for own in q.get_outputs(self._store, owner).values()
                    if own["datastore"] == row["datastore"] and pending_owner(own["digest"])]
        except Exception:  # (the store failed) that one output, at least
            rows = [row]
        try:
            made: dict[str, str] = {}
            for own in rows or [row]:
                try:
                    made[own["name"]] = digest_in_place(own, root)
                except Exception:
                    made[own["name"]] = CHANGED + owner
            self._record(owner, made)
        finally:
            self._finish(owner)

    def fingerprint_later(self, job: StepJob) -> None:
        """``job`` committed with inputs whose digests were pending: its fingerprint and cache entry
        are recorded once they are all made (now, if they are), never when one changed, nor when
        one of its own outputs did (a store that fails leaves the step without one: never reused)."""
        try:
            digests: dict[str, str] = {}
            for name, producer, output, _attempt in job.pending_inputs:
                made = self._known(producer, output)
                if made is None:
                    with self._changed:  # still being made: keyed after it
                        if producer in self._running and producer not in self._recorded:
                            self._waiting.setdefault(producer, []).append(job)
                            return
                    made = self._known(producer, output)  # (made meanwhile)
                    if made is None:
                        return  # lost with an agent that died: never reused
                if made.startswith(CHANGED):
                    return
                digests[name] = made
            inputs = [replace(i, digest=digests[i.name]) if i.name in digests else i for i in job.inputs]
            parts = fingerprint_parts(job.spec, input_digests(job.spec, inputs))
            q.complete_fingerprint(self._store, job.step_run_id, fingerprint(parts), parts, job.cacheable,
                                   definition_of(parts) if job.cacheable else None, unless_output_like=CHANGED + "%")
        except Exception:
            return
        self._on_change(job.step_run_id)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the digests in flight (an agent about to exit); False when some still run."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._running, timeout=timeout)
