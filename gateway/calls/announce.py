"""What callers hear: the announcement before a rejection, and the warning before a
funded call is cut off (docs/dialplan.md, "Announcements"; keys in docs/operations.md).

- A rejected call: the gateway answers REJECT with ``GW_ANNOUNCE``, the prompt for its
  reason (Playback file names joined by ``&``); the dialplan plays it as early media and
  then hangs up with the reason's cause, so the SIP response is the same as without it.
  Stock Asterisk prompts (Debian's ``asterisk-core-sounds-en``) by default; the operator
  may name other files per reason, and per channel language (``agi_language``, the
  language of the caller's PJSIP endpoint: a tenant's phones carry its language), or
  switch a reason off with an empty prompt.
- A funded call whose funding will not grow (its last reservation came back short or
  empty): ``warning_seconds`` before its deadline the gateway has the caller hear
  ``warning_prompt``, through an AMI Originate into the dialplan's ``[gateway-warning]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..rating.model import Reason
from .causes import REJECT_CAUSES

# What Playback may be given: file names (letters, digits, _ . / -) joined by '&'. The
# dialplan checks the same before playing (a ',' would add Playback options).
PROMPT = re.compile(r"[A-Za-z0-9_./-]+(&[A-Za-z0-9_./-]+)*")

# The stock prompts (asterisk-core-sounds-en; their words in the package's
# core-sounds-en.txt) said for each reason the gateway rejects with.
DEFAULT_PROMPTS: dict[str, str] = {
    # "Your call cannot be completed as dialed. Please try your call again later."
    Reason.NO_BALANCE: "cannot-complete-as-dialed&please-try-call-later",
    # "That feature is not available on this line."
    Reason.NO_LICENSE: "feature-not-avail-line",
    Reason.UNKNOWN_CALLER: "feature-not-avail-line",
    # "Your call cannot be completed as dialed. Please check the number and dial again."
    Reason.INVALID_NUMBER: "cannot-complete-as-dialed&check-number-dial-again",
    # "Your call cannot be completed as dialed."
    Reason.BLOCKED_DESTINATION: "cannot-complete-as-dialed",
    Reason.NO_RATE: "cannot-complete-as-dialed",
    # "The number you have dialed is not in service. Please check the number and try
    # again." (inbound: what the carrier's caller hears for an unassigned number)
    Reason.UNKNOWN_NUMBER: "ss-noservice",
    # "All circuits are busy now. Please try your call again later."
    Reason.GATEWAY_ERROR: "all-circuits-busy-now&please-try-call-later",
}

DEFAULT_WARNING_SECONDS = 30
# "beep" twice: the stock tone, heard over the conversation
DEFAULT_WARNING_PROMPT = "beep&beep"

assert set(DEFAULT_PROMPTS) == set(REJECT_CAUSES), "a prompt for every reject reason"


class AnnouncementError(ValueError):
    """A prompt or a reason in the configuration that cannot work; says which."""


def check_prompt(where: str, prompt: str) -> str:
    """``prompt`` when Playback can be given it (empty = nothing played)."""
    if not isinstance(prompt, str) or (prompt and not PROMPT.fullmatch(prompt)):
        raise AnnouncementError(
            f"{where}: {prompt!r} is not a prompt: Playback file names (letters, digits, "
            "_ . / -, no extension) joined by '&', or empty for none")
    return prompt


@dataclass(frozen=True)
class Announcements:
    """The prompts by reason (and language), and the cut-off warning."""

    enabled: bool = True  # announcements before rejections at all
    prompts: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    # language (agi_language) -> reason -> prompt, over ``prompts``
    by_language: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    warning_seconds: int = DEFAULT_WARNING_SECONDS  # 0 = no warning
    warning_prompt: str = DEFAULT_WARNING_PROMPT

    @classmethod
    def configured(cls, *, enabled: bool = True, prompts: Mapping[str, object] | None = None,
                   warning_seconds: int = DEFAULT_WARNING_SECONDS,
                   warning_prompt: str = DEFAULT_WARNING_PROMPT) -> Announcements:
        """From the configuration's ``[announce]`` keys: ``prompts`` maps a reason to its
        prompt, or a language to a table of those; each over the stock defaults."""
        chosen = dict(DEFAULT_PROMPTS)
        languages: dict[str, dict[str, str]] = {}
        for key, value in (prompts or {}).items():
            if isinstance(value, Mapping):
                if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", key):
                    raise AnnouncementError(f"announce.prompts.{key}: not a language name")
                languages[key] = {_reason(f"announce.prompts.{key}", r):
                                  check_prompt(f"announce.prompts.{key}.{r}", p)
                                  for r, p in value.items()}
            else:
                chosen[_reason("announce.prompts", key)] = check_prompt(
                    f"announce.prompts.{key}", value)  # type: ignore[arg-type]
        if not 0 <= warning_seconds <= 3600:
            raise AnnouncementError("announce.warning_seconds must be from 0 (no warning) "
                                    "to 3600")
        check_prompt("announce.warning_prompt", warning_prompt)
        if not warning_prompt:
            raise AnnouncementError("announce.warning_prompt: empty; to have no warning set "
                                    "announce.warning_seconds = 0")
        return cls(enabled=enabled, prompts=chosen, by_language=languages,
                   warning_seconds=warning_seconds, warning_prompt=warning_prompt)

    def for_rejection(self, reason: str, language: str = "") -> str:
        """The prompt a call rejected for ``reason`` hears ("" = none)."""
        if not self.enabled:
            return ""
        table = self.by_language.get(language)
        if table is not None and reason in table:
            return table[reason]
        return self.prompts.get(reason, "")


def _reason(where: str, name: str) -> str:
    if name not in REJECT_CAUSES:
        raise AnnouncementError(
            f"{where}: {name!r} is not a reason a call is rejected for (one of "
            f"{', '.join(sorted(REJECT_CAUSES))}), nor a table of one language's prompts")
    return str(Reason(name))


def warning_due(funded_left: float, warning_seconds: int) -> float | None:
    """Seconds from now until the warning of a call ``funded_left`` seconds from its
    deadline: ``funded_left - warning_seconds``; 0 (at once) when that moment has passed
    but the deadline has not; None when there is no warning to give (switched off, or
    the deadline is here). A call funded for less than ``warning_seconds`` in all is
    warned as soon as it is known that its funding will not grow."""
    if warning_seconds <= 0 or funded_left <= 0:
        return None
    return max(0.0, funded_left - warning_seconds)


def renew_margin(renew_before: int, warning_seconds: int, slice_seconds: int) -> float:
    """How long before a slice's end to renew: ``renew_before`` (renew_before_seconds),
    or with warnings on, early enough to know whether funding goes on before the warning
    is due (``warning_seconds`` + 2 s); never more than a third of a slice ahead (so with
    short slices a warning learnt at a renewal may come late: at once, at the renewal)."""
    ahead = renew_before if warning_seconds <= 0 else max(renew_before, warning_seconds + 2)
    return float(min(ahead, max(1, slice_seconds // 3)))
