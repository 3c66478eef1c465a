"""Emergency switches: pause and resume a category or the whole campaign (one stream)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from services.kernel.contract.policy import Policy
from services.kernel.errors import FailedPrecondition, InvalidArgument
from subsidy.v1 import events_pb2 as ev

from .common import Meta


@dataclass(frozen=True)
class Pause:
    reason: str
    actor_id: str
    since: dt.datetime


@dataclass(frozen=True)
class Switches:
    """What is paused right now; read by every VerifyItem."""

    campaign: Pause | None = None
    categories: Mapping[str, Pause] = field(default_factory=dict)


@dataclass(frozen=True)
class PauseCategory:
    category: str
    reason: str


@dataclass(frozen=True)
class ResumeCategory:
    category: str
    reason: str


@dataclass(frozen=True)
class PauseCampaign:
    reason: str


@dataclass(frozen=True)
class ResumeCampaign:
    reason: str


def pause_category(state: Switches | None, command: PauseCategory, policy: Policy) -> list[Message]:
    """Only a category of the policy in force, and only if it is not paused already."""
    switches = state or Switches()
    category = command.category
    if policy.category(category) is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY", "category: not a category of the policy in force", field="category"
        )
    if category in switches.categories:
        raise FailedPrecondition(
            "CATEGORY_ALREADY_PAUSED", f"category: {category} is paused already", field="category"
        )
    return [ev.CategoryPaused(category=category, reason=command.reason)]


def resume_category(state: Switches | None, command: ResumeCategory) -> list[Message]:
    if command.category not in (state or Switches()).categories:
        raise FailedPrecondition(
            "CATEGORY_NOT_PAUSED", f"category: {command.category} is not paused", field="category"
        )
    return [ev.CategoryResumed(category=command.category, reason=command.reason)]


def pause_campaign(state: Switches | None, command: PauseCampaign) -> list[Message]:
    if (state or Switches()).campaign is not None:
        raise FailedPrecondition("CAMPAIGN_ALREADY_PAUSED", "the campaign is paused already")
    return [ev.CampaignPaused(reason=command.reason)]


def resume_campaign(state: Switches | None, command: ResumeCampaign) -> list[Message]:
    if (state or Switches()).campaign is None:
        raise FailedPrecondition("CAMPAIGN_NOT_PAUSED", "the campaign is not paused")
    return [ev.CampaignResumed(reason=command.reason)]


def evolve(state: Switches | None, event: Message, meta: Meta) -> Switches:
    """The switches after one event: a pause records who and since when; a resume lifts it."""
    switches = state or Switches()
    if isinstance(event, ev.CampaignPaused):
        return Switches(Pause(event.reason, meta.actor_id, meta.at), switches.categories)
    if isinstance(event, ev.CampaignResumed):
        return Switches(None, switches.categories)
    categories = dict(switches.categories)
    if isinstance(event, ev.CategoryPaused):
        categories[event.category] = Pause(event.reason, meta.actor_id, meta.at)
    elif isinstance(event, ev.CategoryResumed):
        categories.pop(event.category, None)
    else:
        raise ValueError(f"switches: not a switch event: {type(event).__name__}")
    return Switches(switches.campaign, categories)
