"""Policy versions, maker-checker: an operator drafts, a different approver approves.

A version is drafted once and never edited; its approval publishes it (``PolicyPublished``,
which eligibility consumes), and it is in force from its ``effective_from`` on. The shipped
default is published by the service itself, without a draft.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Final

from google.protobuf.message import Message

from services.kernel.contract.policy import Policy, policy_of, policy_to_proto
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from .common import APPROVED, DRAFT, Meta

# An approved version must reach every replica (they refresh twice a second) before it takes
# effect, or a replica could compute a reservation under the version it replaces.
APPROVAL_LEAD: Final = dt.timedelta(seconds=1)
SHIPPED_DEFAULT: Final = "shipped default policy"


@dataclass(frozen=True)
class PolicyRecord:
    """A policy version as the catalog knows it: its document, drafted, maybe approved."""

    policy: Policy
    status: str
    drafted_by: str
    draft_reason: str = ""
    drafted_at: dt.datetime | None = None
    approved_by: str = ""
    approve_reason: str = ""
    approved_at: dt.datetime | None = None

    @property
    def version(self) -> str:
        return self.policy.version

    @property
    def effective_from(self) -> dt.datetime:
        return self.policy.effective_from


@dataclass(frozen=True)
class DraftPolicy:
    policy: Policy  # validated from the operator's YAML or JSON at the edge
    reason: str


@dataclass(frozen=True)
class ApprovePolicy:
    version: str
    approver: common_pb2.Actor
    reason: str


def require_approver(actor: common_pb2.Actor) -> None:
    """Only a person in the approver role may approve (the checker of maker-checker)."""
    if actor.kind != common_pb2.Actor.KIND_APPROVER:
        raise PermissionDenied(
            "APPROVER_ROLE_REQUIRED", "actor.kind: only an approver may approve", field="actor.kind"
        )


def _published(policy: Policy) -> ev.PolicyPublished:
    published = ev.PolicyPublished(version=policy.version, policy=policy_to_proto(policy))
    published.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    return published


def draft_policy(
    state: PolicyRecord | None, command: DraftPolicy, now: dt.datetime
) -> list[Message]:
    """An operator proposes a new version; it does nothing until a second person approves."""
    policy = command.policy
    if state is not None:
        raise AlreadyExists(
            "POLICY_VERSION_EXISTS",
            f"document.version: {policy.version} exists already ({state.status}); "
            "never edit a version, draft a new one",
            field="document.version",
        )
    if policy.effective_from <= now:
        raise InvalidArgument(
            "EFFECTIVE_FROM_PASSED",
            "document.effective_from: must be in the future (no retroactive rules)",
            field="document.effective_from",
        )
    drafted = ev.PolicyDrafted(
        version=policy.version, reason=command.reason, policy=policy_to_proto(policy)
    )
    drafted.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    return [drafted]


def approve_policy(
    state: PolicyRecord | None, command: ApprovePolicy, now: dt.datetime
) -> list[Message]:
    """A different approver activates a draft from its effective_from on."""
    if state is None:
        raise NotFound("UNKNOWN_POLICY_VERSION", "version: no such policy draft", field="version")
    require_approver(command.approver)
    if state.status != DRAFT:
        raise FailedPrecondition(
            "POLICY_ALREADY_APPROVED",
            f"version: {state.version} is {state.status}",
            field="version",
        )
    if command.approver.id == state.drafted_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "actor.id: the approver must be a different person from the drafter",
            field="actor.id",
        )
    if state.effective_from <= now + APPROVAL_LEAD:
        raise FailedPrecondition(
            "EFFECTIVE_FROM_PASSED",
            f"version: {state.version} would take effect before every replica has it; "
            "draft a new version with a later effective_from",
            field="version",
        )
    approved = ev.PolicyApproved(
        version=state.version, reason=command.reason, drafted_by=state.drafted_by
    )
    return [approved, _published(state.policy)]


def publish_default(state: PolicyRecord | None, policy: Policy) -> list[Message]:
    """The shipped default, once: a version that exists already (another replica published
    it first) is left alone."""
    return [] if state is not None else [_published(policy)]


def evolve(state: PolicyRecord | None, event: Message, meta: Meta) -> PolicyRecord:
    """The version after one of its events."""
    if isinstance(event, ev.PolicyDrafted):
        return PolicyRecord(policy_of(event), DRAFT, meta.actor_id, event.reason, meta.at)
    if isinstance(event, ev.PolicyApproved) and state is not None:
        return replace(
            state,
            status=APPROVED,
            approved_by=meta.actor_id,
            approve_reason=event.reason,
            approved_at=meta.at,
        )
    if isinstance(event, ev.PolicyPublished):
        if state is not None:
            return state  # published on approval: the approval changed the status already
        return PolicyRecord(
            policy_of(event),
            APPROVED,
            meta.actor_id,
            SHIPPED_DEFAULT,
            meta.at,
            meta.actor_id,
            SHIPPED_DEFAULT,
            meta.at,
        )
    raise ValueError(f"policy version: {type(event).__name__} cannot follow {state!r}")
