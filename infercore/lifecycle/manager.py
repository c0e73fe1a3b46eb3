"""Rollout decisions: stage moves, approvals, weights, rollback, loads, all audited.

The runtime does the mechanics (:meth:`Runtime.set_stage` and friends, which validate before
changing anything); :class:`Lifecycle` adds the policy: which moves are allowed, which need a
person's approval (``models.<m>.rollout.approvals``), and a record of every decision with who
made it, when and why in the append-only audit log.

Versions move candidate -> shadow -> canary(weight) -> primary -> retired. A move may skip
stages, but not approvals: a move that passes a gated stage (shadow straight to primary when
``canary`` is gated) needs an approval too. Moves back (canary -> shadow, anything -> retired)
need none. Rollback never needs one.

When ``primary`` is gated, no change of weights or stages may leave the primary with 0 % of
the traffic: a canary taking it all would be the primary in all but name (promote it instead,
which needs the approval). A canary's weight may otherwise be raised above the one its approval
granted: the approval gates entering the stage, the weights are the operator's to tune.

Under a router that names its versions (an A/B router's arms), a canary takes a weight only as
one of them: 409, as the recipe is refused at start-up, since a version in no arm would join
the experiment unnamed.

An approval is for a step from the state its request saw. Applying a stage move of a version,
a rollback or an unload supersedes the affected versions' other pending approvals (their status
becomes ``superseded``; approving one is a 409 that says why): ask again from the new state.

Every step's meaning depends on the model's primary (a canary's share is taken from it, a
promotion to primary replaces it, a shadow is compared with it): an approval records the
primary it was asked under and the version's stage then (``primary``, ``from_stage``). A change
of primary (a promotion to primary, a rollback) supersedes every pending approval of the
model, at once, audited with the change: the list shows it, the pending gauge drops, and the
approver is not left to find out by approving. Approving checks both again all the same (a
restored state, or a change made around the lifecycle): one that no longer holds supersedes
the approval there, audited, and answers 409 naming what changed.

A canary guard trip (the runtime drops a failing canary to weight 0) supersedes the
version's pending approvals too, audited with the guard's reason: an approval asked for before
the trip must not carry a broken version to primary. The version's description says when the
guard dropped it, until it is moved or given a weight again.

With ``admin.state_file`` the rollout is saved after every change and restored at start-up
(:mod:`infercore.lifecycle.state`); until it is restored, changes are refused (503). The
snapshot is taken on the event loop; the write happens on the state file's own thread
(:class:`~infercore.lifecycle.state.StateWriter`), and :meth:`Lifecycle.close` waits for it.
Each change made through a call of this class returns once it is written (without blocking the
event loop), at most :data:`STATE_WAIT_S` seconds, and its answer says how that went in
``"state_file"`` (:data:`STATE_WRITTEN`, :data:`STATE_FAILED` or :data:`STATE_WRITING`): a 2xx
alone does not say that the change is on disk.

A decision that could not be recorded is not made: 503 ``audit_unavailable``, nothing
changed. Decisions are recorded before they are carried out; a load or an unload, whose outcome
is known only once done, is recorded when asked (``load_requested``, ``unload_requested``) and
again when done (``loaded``/``load_failed``, ``unloaded``/``unload_failed``), refusals that
tried nothing included. Opening the file is no proof that a line can be written to it (a full disk
opens and then fails every write), so the request's own line is the check.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from infercore.components.routing import describe_named
from infercore.errors import ConfigError, InfercoreError, InvalidInput, ModelNotReady, NotFound
from infercore.lifecycle import state as rollout_state
from infercore.lifecycle.audit import AuditLog, now_iso
from infercore.lifecycle.control import LifecycleRollout
from infercore.runtime.errors import Conflict
from infercore.runtime.served import (
    CANARY,
    CANDIDATE,
    PRIMARY,
    RETIRED,
    SHADOW,
    STAGES,
    Event,
)

if TYPE_CHECKING:
    from infercore.runtime import Runtime

#: Order along the rollout; retired counts as a fresh start.
_ORDER = {CANDIDATE: 0, RETIRED: 0, SHADOW: 1, CANARY: 2, PRIMARY: 3}
#: Moves a version may make from each stage (the primary moves only when replaced).
ALLOWED: dict[str, frozenset[str]] = {
    CANDIDATE: frozenset({SHADOW, CANARY, PRIMARY, RETIRED}),
    SHADOW: frozenset({CANDIDATE, CANARY, PRIMARY, RETIRED}),
    CANARY: frozenset({CANDIDATE, SHADOW, PRIMARY, RETIRED}),
    RETIRED: frozenset({CANDIDATE, SHADOW, CANARY, PRIMARY}),
    PRIMARY: frozenset(),
}
_MAX_ACTOR = 64
#: Longest an admin call waits for ``admin.state_file`` to hold its change (a hung volume
#: would hold it for ever); past it the call answers, the change made, with a WARNING.
STATE_WAIT_S = 10.0
#: ``"state_file"`` in a change's answer (with ``admin.state_file``; absent without one): the
#: change is on disk ...
STATE_WRITTEN = "written"
#: ... its write failed (a full disk, a read-only volume: logged, and counted in
#: ``infercore_rollout_state_save_failures_total``); a restart now would not restore it ...
STATE_FAILED = "failed"
#: ... or its write was still running after :data:`STATE_WAIT_S` (a slow or hung volume): it
#: lands once the volume answers, and a restart before that serves the state before it.
#: Not ``pending``, which an answer's ``status`` says of an approval.
STATE_WRITING = "writing"
STATE_FILE_OUTCOMES = (STATE_WRITTEN, STATE_FAILED, STATE_WRITING)
_MAX_REASON = 500
_STATUSES = ("pending", "approved", "rejected", "superseded")

log = logging.getLogger("infercore.lifecycle")

#: The name of the admin token (``admin.tokens_file``) the current admin request presented;
#: ``None`` with the shared token, or outside a request. The admin listener sets it; a record
#: whose ``actor`` is that name says ``"authenticated": true`` (the name is the token's, not
#: one the caller typed). A load sets it to ``None`` while the version starts: the tasks it
#: starts then (a batcher's collector) outlive the request and must not act as its token.
AUTHENTICATED_ACTOR: ContextVar[str | None] = ContextVar("authenticated_actor", default=None)


class AuditUnavailable(InfercoreError):
    status_code = 503
    reason = "audit_unavailable"


def _audit_unavailable(exc: OSError) -> AuditUnavailable:
    return AuditUnavailable(
        f"the audit log cannot be written ({exc.strerror}); nothing changed",
        hint="fix admin.audit_log (a writable file)",
    )


def check_actor(by: Any) -> str:
    """Who made a decision: 1-64 printable characters."""
    if not isinstance(by, str) or not by.strip():
        raise InvalidInput("say who decides: `by` (e.g. your user name)")
    actor = str(by).strip()
    if len(actor) > _MAX_ACTOR or not actor.isprintable():
        raise InvalidInput(f"`by` must be 1-{_MAX_ACTOR} printable characters")
    return actor


def check_reason(reason: Any) -> str:
    if reason is None:
        return ""
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise InvalidInput(f"`reason` must be text of at most {_MAX_REASON} characters")
    return " ".join(reason.split())


@dataclass(slots=True)
class Approval:
    """A rollout step waiting for (or decided by) a person."""

    id: str
    model: str
    version: str
    to: str
    weight: float | None
    requested_by: str
    requested_at: str
    reason: str
    gates: list[str]
    status: str = "pending"
    decided_by: str | None = None
    decided_at: str | None = None
    decision_reason: str | None = None
    #: The model's primary and the version's stage when it was asked for: the step means
    #: what it means only while both hold (``None`` only until a restore fills them in).
    primary: str | None = None
    from_stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lifecycle:
    """Stage moves with approvals and an audit log, over one runtime.

    Args:
        runtime: The runtime whose models it moves.
        audit: Where decisions go (default: ``admin.audit_log`` of the runtime's config).
    """

    def __init__(self, runtime: Runtime, audit: AuditLog | None = None) -> None:
        self.runtime = runtime
        admin = runtime.config.admin
        self.audit = audit or AuditLog(admin.audit_log)
        self.approvals: dict[str, Approval] = {}
        #: The canary guard's latest trip of each (model, version), until it moves again.
        self.guard_trips: dict[tuple[str, str], dict[str, Any]] = {}
        #: ``admin.state_file`` (locked while this server runs); ``None``: in memory only.
        self.state: rollout_state.StateFile | None = None
        #: Writes it off the event loop (with ``state``).
        self.writer: rollout_state.StateWriter | None = None
        #: Changes are refused until the saved rollout is restored (:meth:`restore_state`).
        self._restoring = False
        # An empty path (`admin.state_file=` on the command line) is no path: unset.
        if admin.state_file and runtime.config.server.workers != 1:
            raise ConfigError(
                f"admin.state_file: server.workers is {runtime.config.server.workers}; each "
                "worker would keep (and save) its own rollout",
                hint="use server.workers=1 with admin.state_file",
            )
        # Drift actions (a retrained version registered as a candidate) act through the same
        # lifecycle as the admin API; an action that cannot work refuses here, at start-up.
        for name, served in runtime.models.items():
            if served.drift is not None:
                served.drift.bind_rollout(LifecycleRollout(self, name))
                served.drift.action_listeners.append(self._on_drift_actions)
        runtime.listeners.append(self._on_event)
        if admin.state_file:
            # Last: the lock is held from here on (released by close()).
            self.state = rollout_state.StateFile(admin.state_file, audit_log=admin.audit_log)
            self.writer = rollout_state.StateWriter(
                self.state, runtime.metrics.rollout_state_save_failures.inc
            )
            self._restoring = True

    # -- the saved rollout ----------------------------------------------------------------

    async def restore_state(self) -> None:
        """Restore the rollout ``admin.state_file`` holds (all or nothing), or say at start-up
        what the previous run changed that is not restored. The runtime calls it once its
        recipe's versions have loaded, before it reports ready."""
        try:
            await rollout_state.restore(self)
        finally:
            self._restoring = False

    def close(self, timeout: float = rollout_state.FLUSH_TIMEOUT_S) -> None:
        """Write the last change to the state file, then release it (the server stops).

        Waits up to ``timeout`` seconds for the write (it blocks: the server is stopping).
        """
        if self.writer is not None and not self.writer.close(timeout):
            log.error(
                "admin.state_file: the last rollout change was still being written after "
                "%gs at shutdown; the file holds it or the change before (it is replaced "
                "whole), and its lock is released when the write ends",
                timeout,
            )

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait (without blocking the event loop) until every change is written to the
        state file (or its write failed); False on timeout."""
        writer = self.writer
        if writer is None:
            return True
        return await asyncio.to_thread(writer.wait_idle, timeout)

    def _save(self) -> Future[bool] | None:
        """Save the rollout to ``admin.state_file`` (after every change): the snapshot now,
        on the event loop; the write soon, on the writer's thread. Returns the write's future
        (see :meth:`StateWriter.submit`), ``None`` when nothing is saved."""
        if self.writer is None or self._restoring:
            return None
        return self.writer.submit(rollout_state.snapshot_doc(self))

    async def _save_and_wait(self) -> str | None:
        """:meth:`_save`, then wait (without blocking the event loop) until a write that holds
        this change is done, and say how it went: :data:`STATE_WRITTEN` (on disk),
        :data:`STATE_FAILED` (logged and counted by the writer; the change is made all the
        same) or :data:`STATE_WRITING` (still running after :data:`STATE_WAIT_S`, a hung
        volume: left to finish on its own, with a WARNING); ``None`` without
        ``admin.state_file``. The caller puts it in its answer (:meth:`_saved`)."""
        saving = self._save()
        if saving is None:
            return None
        done, _ = await asyncio.wait({asyncio.wrap_future(saving)}, timeout=STATE_WAIT_S)
        if not done:
            log.warning(
                "admin.state_file: the write of this change has taken over %.0f s (a slow or "
                "hung volume); answered anyway: the change is made, and is written once the "
                "volume answers (a restart before that serves the state before it)",
                STATE_WAIT_S,
            )
            return STATE_WRITING
        return STATE_WRITTEN if done.pop().result() else STATE_FAILED

    async def _saved(self, answer: dict[str, Any]) -> dict[str, Any]:
        """``answer`` once its change is written (:meth:`_save_and_wait`), with
        ``"state_file"`` saying how that went when there is a state file."""
        outcome = await self._save_and_wait()
        if outcome is not None:
            answer["state_file"] = outcome
        return answer

    def _check_restored(self) -> None:
        if self._restoring:
            raise ModelNotReady(
                "the server is starting: the rollout saved in admin.state_file is not restored "
                "yet; nothing changed",
                hint="try again once /v2/health/ready answers 200",
            )

    def _on_drift_actions(self, at: float) -> None:
        self._save()  # the cooldown's start

    # -- records --------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        # The runtime's own decisions (the guard); those made here are recorded here.
        if event.get("event") == "guard_tripped":
            self._guard_tripped(event)
        elif event.get("actor") == "guard":
            self._record(dict(event), strict=False)

    def _guard_tripped(self, event: Event) -> None:
        """The guard dropped a canary to weight 0: its pending approvals are superseded (a
        step asked for before the trip would otherwise carry a broken version on), and its
        description says so."""
        model, version = str(event.get("model")), str(event.get("version"))
        stale = self._pending_for(model, {version})
        record = dict(event)
        if stale:
            record["superseded"] = [a.id for a in stale]
        entry = self._record(record, strict=False)
        at = str(entry.get("ts") or now_iso())
        cause, detail = event.get("cause", ""), event.get("reason", "")
        self.guard_trips[(model, version)] = {
            "at": at,
            "cause": cause,
            "reason": detail,
            "weight_before": event.get("weight_before"),
        }
        self._supersede(
            stale,
            by="guard",
            why=f"the canary guard dropped version {version!r} to weight 0 at {at} "
            f"({cause}: {detail})",
        )
        self._save()

    def _record(self, record: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
        # strict=False: the decision is already carried out (a load, an unload, the guard);
        # the record is then kept in memory and logged with a warning if the file fails.
        name = AUTHENTICATED_ACTOR.get()
        if name is not None and record.get("actor") == name:
            record = {**record, "authenticated": True}
        try:
            return self.audit.append(record, strict=strict)
        except OSError as exc:
            raise _audit_unavailable(exc) from None

    def _record_request(self, event: str, model: str, version: str, by: str, why: Any) -> None:
        """Record a load or an unload when asked: refused (nothing changes) when it cannot be."""
        self._record(
            {"event": event, "model": model, "version": version, "actor": by, "reason": why}
        )

    def _pending_for(
        self, model: str, versions: set[str] | None, *, keep: Approval | None = None
    ) -> list[Approval]:
        """The pending approvals of ``versions`` of ``model`` (``None``: of all its versions),
        but ``keep``."""
        return [
            a
            for a in self.approvals.values()
            if a.model == model
            and (versions is None or a.version in versions)
            and a.status == "pending"
            and a is not keep
        ]

    def _supersede(self, stale: list[Approval], *, by: str, why: str) -> None:
        if not stale:
            return
        decided_at = now_iso()
        for a in stale:
            a.status, a.decided_by, a.decided_at, a.decision_reason = (
                "superseded",
                by,
                decided_at,
                why,
            )
        self._pending_gauge(stale[0].model)

    def _pending_gauge(self, model: str) -> None:
        n = sum(1 for a in self.approvals.values() if a.model == model and a.status == "pending")
        self.runtime.metrics.approvals_pending.labels(model).set(n)

    pending_gauge = _pending_gauge

    # -- reading --------------------------------------------------------------------------

    def describe(self, model: str | None = None) -> list[dict[str, Any]]:
        names = [model] if model is not None else list(self.runtime.models)
        out = []
        for name in names:
            served = self.runtime.model(name)
            doc = served.describe()
            for vdoc in doc["versions"]:
                trip = self.guard_trips.get((name, vdoc["version"]))
                if trip is not None:
                    vdoc["guard_tripped"] = dict(trip)
                    vdoc["note"] = (
                        f"canary guard dropped it to weight 0 at {trip['at']} "
                        f"({trip['cause']}: {trip['reason']})"
                    )
            doc["approvals_required"] = list(served.config.rollout.approvals)
            doc["pending_approvals"] = [
                a.id for a in self.approvals.values() if a.model == name and a.status == "pending"
            ]
            out.append(doc)
        return out

    def list_approvals(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is not None and status not in _STATUSES:
            raise InvalidInput(
                f"unknown approval status {status[:20]!r}",
                hint=", ".join(_STATUSES),
            )
        return [a.to_dict() for a in self.approvals.values() if status in (None, a.status)]

    def shadow_summary(self, model: str) -> dict[str, Any]:
        served = self.runtime.model(model)
        runner = served.shadow
        versions: dict[str, Any] = {}
        if runner is not None:
            for version, stats in runner.stats.items():
                sv = served.versions.get(version)
                doc = stats.summary()
                doc["stage"] = sv.stage if sv is not None else None
                versions[version] = doc
        return {
            "model": model,
            "primary": served.primary,
            "mirroring": runner is not None,
            "queue_depth": runner.depth if runner is not None else 0,
            "queue_size": runner.policy.queue_size if runner is not None else 0,
            "versions": versions,
        }

    # -- decisions ------------------------------------------------------------------------

    def gates(self, model: str, current: str, target: str) -> list[str]:
        """The gated stages a move from ``current`` to ``target`` passes (needs approval)."""
        served = self.runtime.model(model)
        gated = served.config.rollout.approvals
        lo, hi = _ORDER[current], _ORDER.get(target, 0)
        return [s for s in (SHADOW, CANARY, PRIMARY) if s in gated and lo < _ORDER[s] <= hi]

    def _check_move(self, model: str, version: str, to: str, weight: float | None) -> str:
        served = self.runtime.model(model)
        sv = served.version(version)
        if to not in STAGES:
            raise InvalidInput(f"unknown stage {to[:20]!r}", hint=f"stages: {', '.join(STAGES)}")
        current = sv.stage
        if to == current:
            raise Conflict(
                f"model {model!r} version {version!r} is already {to}",
                hint="to change a canary's weight, set the weights",
            )
        if to not in ALLOWED[current]:
            raise Conflict(
                f"model {model!r} version {version!r} is the primary; it moves only when "
                "another version is promoted, or by a rollback"
            )
        # Everything the runtime would refuse, refused now (nothing changes on a dry run).
        self.runtime.set_stage(model, version, to, weight, dry_run=True)
        if to == CANARY:
            if weight:
                self._check_in_arms(model, [version])
            others = sum(
                o.weight for v, o in served.versions.items() if o.stage == CANARY and v != version
            )
            self._check_primary_share(model, 100.0 - others - float(weight or 0.0), version)
        return current

    def _check_in_arms(self, model: str, canaries: list[str]) -> None:
        """Under a router that names its versions (A/B arms), only those share the traffic.

        A canary given a weight outside them would join the experiment under its version's
        name, unnoticed: refused, as the recipe is at start-up. The arms are recipe config,
        so the fix is a weight of 0 here, or an arm in the recipe and a restart.
        """
        served = self.runtime.model(model)
        named = served.router.named_versions()
        if not named:
            return
        arms = set(named.values())
        for version in canaries:
            if version in arms:
                continue
            raise Conflict(
                f"model {model!r}: version {version!r} is in no arm of its router "
                f"({describe_named(named)}); a canary weight would mix it into the experiment "
                "unnamed",
                hint=f"give {version!r} weight 0, or add it to an arm in the recipe "
                "(routing.arms) and restart",
            )

    def _check_primary_share(self, model: str, share: float, canary: str) -> None:
        """With ``primary`` gated, the primary keeps some traffic (else promote, approved)."""
        served = self.runtime.model(model)
        if PRIMARY not in served.config.rollout.approvals or share > 1e-6:
            return
        raise Conflict(
            f"model {model!r}: this would leave the primary ({served.primary!r}) 0 % of the "
            f"traffic, making canary {canary!r} the primary without the approval "
            f"models.{model}.rollout.approvals requires for primary",
            hint=f"promote it instead (needs an approval): infercore models promote {model} "
            f"{canary} --to primary",
        )

    async def promote(
        self,
        model: str,
        version: str,
        to: str,
        *,
        weight: float | None = None,
        by: str,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Move a version to stage ``to``, or ask for an approval when the recipe gates it.

        Returns ``{"status": "applied", "model": ...}`` or ``{"status": "pending",
        "approval": ...}``.
        """
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        current = self._check_move(model, version, to, weight)
        gates = self.gates(model, current, to)
        if gates:
            primary = self.runtime.model(model).primary
            for a in self.approvals.values():
                if (a.model, a.version, a.to, a.status) == (model, version, to, "pending"):
                    raise Conflict(
                        f"approval {a.id} for this step is already pending",
                        hint=f"approve or reject it: infercore models approve {a.id}",
                    )
            approval = Approval(
                id=secrets.token_hex(4),
                model=model,
                version=version,
                to=to,
                weight=weight,
                requested_by=by,
                requested_at=now_iso(),
                reason=why,
                gates=gates,
                primary=primary,
                from_stage=current,
            )
            self._record(
                {
                    "event": "approval_requested",
                    "approval": approval.id,
                    "model": model,
                    "version": version,
                    "from": current,
                    "to": to,
                    "weight": weight,
                    "primary": primary,
                    "actor": by,
                    "reason": why,
                    "gates": gates,
                }
            )
            self.approvals[approval.id] = approval
            self._pending_gauge(model)
            return await self._saved({"status": "pending", "approval": approval.to_dict()})
        self._apply(model, version, current, to, weight, by=by, reason=why, approval=None)
        return await self._saved({"status": "applied", "model": self.describe(model)[0]})

    def _apply(
        self,
        model: str,
        version: str,
        current: str,
        to: str,
        weight: float | None,
        *,
        by: str,
        reason: str,
        approval: Approval | None,
    ) -> None:
        previous = self.runtime.model(model).primary
        record: dict[str, Any] = {
            "event": "promoted",
            "model": model,
            "version": version,
            "from": current,
            "to": to,
            "actor": by,
            "reason": reason,
        }
        if weight is not None:
            record["weight"] = weight
        if to == PRIMARY:
            record["previous_primary"] = previous
        if approval is not None:
            record["approval"] = approval.id
            record["requested_by"] = approval.requested_by
        # A new primary changes what every pending step of the model means: all of them go.
        stale = self._pending_for(model, None if to == PRIMARY else {version}, keep=approval)
        if stale:
            record["superseded"] = [a.id for a in stale]
        self._record(record)
        self.runtime.set_stage(model, version, to, weight)
        self.guard_trips.pop((model, version), None)
        via = f" (approval {approval.id})" if approval is not None else ""
        why = f"version {version!r} moved {current} -> {to}{via}"
        if to == PRIMARY:
            why = f"the primary of model {model!r} changed from {previous!r} to {version!r}: {why}"
        self._supersede(stale, by=by, why=why)

    async def approve(
        self, approval_id: str, *, by: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Approve a pending step and carry it out (checked again against the state now)."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        a = self._pending(approval_id)
        served = self.runtime.model(a.model)
        await self._check_context(a, by)
        if served.config.rollout.distinct_approver and by == a.requested_by:
            raise Conflict(
                f"approval {a.id} was requested by {by!r}; another person must approve it"
            )
        current = self._check_move(a.model, a.version, a.to, a.weight)
        self._decide(a, "approved", by, why)
        self._apply(a.model, a.version, current, a.to, a.weight, by=by, reason=why, approval=a)
        return await self._saved(
            {"status": "applied", "approval": a.to_dict(), "model": self.describe(a.model)[0]}
        )

    async def _check_context(self, a: Approval, by: str) -> None:
        """The primary and the version's stage the step was asked under hold still; else the
        approval is superseded (audited, saved) and approving it is a 409 saying what changed,
        once the state file holds the supersession (as every change's answer waits for it).

        A change of primary through this lifecycle supersedes at once (:meth:`_apply`,
        :meth:`rollback`): this catches what came another way (a restored state)."""
        served = self.runtime.model(a.model)
        sv = served.versions.get(a.version)
        stage = sv.stage if sv is not None else None
        if a.primary is not None and served.primary != a.primary:
            changed = (
                f"the primary of model {a.model!r} is {served.primary!r} now; it was "
                f"{a.primary!r} when the step was asked for"
            )
        elif a.from_stage is not None and stage != a.from_stage:
            changed = (
                f"version {a.version!r} is {stage or 'gone'} now; it was {a.from_stage} "
                "when the step was asked for"
            )
        else:
            return
        self._record(
            {
                "event": "superseded",
                "approval": a.id,
                "model": a.model,
                "version": a.version,
                "to": a.to,
                "actor": "server",
                "reason": changed,
                "attempted_by": by,
                "requested_by": a.requested_by,
            }
        )
        self._supersede([a], by="server", why=f"{changed} (found when {by} approved it)")
        await self._save_and_wait()  # the 409 too answers once the file holds the change
        raise Conflict(
            f"approval {a.id} (model {a.model!r} version {a.version!r} -> {a.to}) is "
            f"superseded: {changed}; approving it would carry out a step nobody saw in this "
            "state",
            hint=f"ask again from the state now: infercore models promote {a.model} "
            f"{a.version} --to {a.to}",
        )

    async def reject(
        self, approval_id: str, *, by: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Reject a pending step; nothing moves."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        a = self._pending(approval_id)
        self._decide(a, "rejected", by, why)
        return await self._saved({"status": "rejected", "approval": a.to_dict()})

    def _decide(self, a: Approval, decision: str, by: str, why: str) -> None:
        """Record a decision on a pending step (``approved`` or ``rejected``) and mark it."""
        self._record(
            {
                "event": decision,
                "approval": a.id,
                "model": a.model,
                "version": a.version,
                "to": a.to,
                "actor": by,
                "reason": why,
                "requested_by": a.requested_by,
            }
        )
        a.status, a.decided_by, a.decided_at, a.decision_reason = decision, by, now_iso(), why
        self._pending_gauge(a.model)

    def _pending(self, approval_id: str) -> Approval:
        a = self.approvals.get(approval_id)
        if a is None:
            if self.state is None:
                hint = (
                    "infercore models approvals lists the approvals this server knows; pending "
                    "approvals do not survive a restart unless admin.state_file is set (ask "
                    "again: infercore models promote ...)"
                )
            else:
                hint = (
                    "infercore models approvals lists the approvals this server knows; only "
                    "pending ones are kept across restarts (admin.state_file)"
                )
            raise NotFound(f"no approval {approval_id[:20]!r}", hint=hint)
        if a.status == "superseded":
            raise Conflict(
                f"approval {a.id} was superseded by {a.decided_by} at {a.decided_at}: "
                f"{a.decision_reason}",
                hint=f"ask again from the state now: infercore models promote {a.model} "
                f"{a.version} --to {a.to}",
            )
        if a.status != "pending":
            raise Conflict(
                f"approval {a.id} was already {a.status} by {a.decided_by} at {a.decided_at}"
            )
        return a

    async def set_weights(
        self, model: str, weights: dict[str, float], *, by: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Set the primary's and canaries' shares (adding up to 100)."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        if not isinstance(weights, dict) or not weights:
            raise InvalidInput("give the weights: {version: percent, ...}")
        self.runtime.set_weights(model, weights, dry_run=True)
        served = self.runtime.model(model)
        self._check_in_arms(
            model, [v for v, w in weights.items() if v != served.primary and float(w) > 0]
        )
        if float(weights[served.primary]) <= 1e-6:
            top = max((v for v in weights if v != served.primary), key=lambda v: weights[v])
            self._check_primary_share(model, 0.0, top)
        self._record(
            {
                "event": "weights_set",
                "model": model,
                "weights": weights,
                "actor": by,
                "reason": why,
            }
        )
        self.runtime.set_weights(model, weights)
        for version, value in weights.items():
            if float(value) > 0:
                self.guard_trips.pop((model, version), None)
        return await self._saved({"status": "applied", "model": self.describe(model)[0]})

    async def rollback(self, model: str, *, by: str, reason: str | None = None) -> dict[str, Any]:
        """Back to the last primary (loading it if it was unloaded); canary weights to 0."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        runtime = self.runtime
        served = runtime.model(model)
        target = runtime.previous_primary(model)
        if target is not None and not served.versions[target].ready:
            await self.load(model, target, by=by, reason=f"rollback: {why}".strip(": "))
        current = served.primary
        runtime.rollback(model, dry_run=True)
        # The versions it takes traffic from: the live canaries, and with a new primary every
        # version (each pending step of the model was asked for under the old primary).
        touched = {v for v, sv in served.versions.items() if sv.stage == CANARY and sv.weight > 0}
        stale = self._pending_for(model, None if target is not None else touched)
        record: dict[str, Any] = {
            "event": "rolled_back",
            "model": model,
            "from": current,
            "to": target or current,
            "actor": by,
            "reason": why,
        }
        if stale:
            record["superseded"] = [a.id for a in stale]
        self._record(record)
        runtime.rollback(model)
        moved = f": the primary changed from {current!r} to {target!r}" if target else ""
        self._supersede(stale, by=by, why=f"model {model!r} was rolled back by {by}{moved}")
        return await self._saved({"status": "applied", "model": self.describe(model)[0]})

    async def load(
        self, model: str, version: str, *, by: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Load (or reload) a version; refused, before anything happens, when unrecordable."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        self.runtime.model(model)
        self._record_request("load_requested", model, version, by, why)

        def failed(error: str) -> None:
            # load_requested is on record: so is its outcome.
            self._record(
                {
                    "event": "load_failed",
                    "model": model,
                    "version": version,
                    "actor": by,
                    "reason": why,
                    "error": error,
                },
                strict=False,
            )

        # The tasks the version starts (its batcher's collector, say) outlive this request and
        # copy its context: they must not act as the request's token (AUTHENTICATED_ACTOR).
        # Reset for the load only; the records around it are the request's own.
        anonymous = AUTHENTICATED_ACTOR.set(None)
        try:
            try:
                sv = await self.runtime.load(model, version)
            finally:
                AUTHENTICATED_ACTOR.reset(anonymous)
        except asyncio.CancelledError:
            failed("cancelled: the server stopped while the version loaded")
            raise
        except InfercoreError as exc:
            # Every load_requested on record gets its outcome, refusals that tried nothing
            # (an unknown version, a malformed name, the server draining) included; the
            # runtime counts only real attempts in infercore_model_load_failures_total.
            failed(exc.message)
            raise
        self._record(
            {
                "event": "loaded",
                "model": model,
                "version": version,
                "stage": sv.stage,
                "actor": by,
                "reason": why,
            },
            strict=False,
        )
        return await self._saved({"status": "loaded", "version": sv.describe()})

    async def unload(
        self, model: str, version: str, *, by: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Unload a version (its pending approvals superseded); refused when unrecordable."""
        by, why = check_actor(by), check_reason(reason)
        self._check_restored()
        served = self.runtime.model(model)
        stage = served.version(version).stage
        self._record_request("unload_requested", model, version, by, why)
        try:
            sv = await self.runtime.unload(model, version)
        except InfercoreError as exc:
            # unload_requested is on record: so is its outcome (a conflict, the server
            # draining).
            self._record(
                {
                    "event": "unload_failed",
                    "model": model,
                    "version": version,
                    "actor": by,
                    "reason": why,
                    "error": exc.message,
                },
                strict=False,
            )
            raise
        stale = self._pending_for(model, {version})
        record: dict[str, Any] = {
            "event": "unloaded",
            "model": model,
            "version": version,
            "stage_before": stage,
            "actor": by,
            "reason": why,
        }
        if stale:
            record["superseded"] = [a.id for a in stale]
        self._record(record, strict=False)
        self._supersede(stale, by=by, why=f"version {version!r} was unloaded by {by}")
        self.guard_trips.pop((model, version), None)
        return await self._saved({"status": "unloaded", "version": sv.describe()})
