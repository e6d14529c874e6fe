"""Parse a ReAct completion ("Thought: ...\\nAction: ...") into a thought and one env command."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ACTION = re.compile(r"^\s*action\s*[:：]\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_THOUGHT = re.compile(r"^\s*thought\s*[:：]\s*(.*?)(?=^\s*action\s*[:：]|\Z)", re.IGNORECASE | re.MULTILINE | re.DOTALL)
_MAX_ACTION_CHARS = 200


@dataclass(frozen=True)
class Parsed:
    thought: str
    action: str
    ok: bool  # both fields present and the action non-empty; False counts as a format error


_WRAPPERS = ("``", '""', "''", "[]", "<>")


def _clean_action(text: str) -> str:
    """First line, lower case, without a quoting pair around the whole action or a final full stop. Brackets
    inside an action are kept: ReAct's tools read `search[entity]` and WebShop's `click[buy now]`."""
    action = (text.strip().splitlines()[0] if text.strip() else "").rstrip(".!").strip()
    while len(action) >= 2 and action[0] + action[-1] in _WRAPPERS:
        action = action[1:-1].strip().rstrip(".!").strip()
    return action[:_MAX_ACTION_CHARS].lower()


def parse_react(text: str) -> Parsed:
    """Take the first `Action:` line; without one, fall back to the last non-empty line (still a format error)."""
    thought_match = _THOUGHT.search(text)
    thought = thought_match.group(1).strip() if thought_match else ""
    action_match = _ACTION.search(text)
    if action_match:
        action = _clean_action(action_match.group(1))
        return Parsed(thought, action, ok=bool(action) and thought_match is not None)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    fallback = _clean_action(re.sub(r"^\s*thought\s*[:：]", "", lines[-1], flags=re.IGNORECASE)) if lines else ""
    return Parsed(thought, fallback, ok=False)
