"""Chat-template token building by appending ids.

A conversation starts from the model's own chat template; after that, every turn is added by appending token ids:
the ids the engine sampled go in unchanged, then the ids of the template's "end of assistant turn, user turn,
start of assistant turn" fragment. Generated text is never re-tokenised, so the learner trains on exactly the
tokens that were sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

_PROBE_USER = "\x00user\x00"
_PROBE_ASSISTANT = "\x00assistant\x00"
_PROBE_NEXT = "\x00next\x00"


@dataclass
class ChatFormatter:
    tokenizer: object

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.eos_id: int = tok.convert_tokens_to_ids(tok.eos_token)
        # Learn the template's turn boundaries once from probe conversations (works for any chat template).
        base = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        closed = self._render(base, gen=False)
        cont = self._render(base + [{"role": "user", "content": _PROBE_NEXT}], gen=True)
        if not cont.startswith(closed):
            raise ValueError("chat template does not extend a conversation by appending; unsupported template")
        after_assistant = closed[closed.index(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT):]
        if not after_assistant.startswith(tok.eos_token):
            raise ValueError("chat template does not close assistant turns with the eos token; unsupported template")
        # Text between the assistant's eos token and the next user content, and after that content.
        between = after_assistant[len(tok.eos_token):] + cont[len(closed):]
        self._user_head, self._user_tail = between.split(_PROBE_NEXT)

    def _render(self, messages: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def start(self, system: str, user: str) -> list[int]:
        """Token ids of [system, user] plus the assistant generation prompt."""
        text = self._render([{"role": "system", "content": system}, {"role": "user", "content": user}], gen=True)
        return self.encode(text)

    def close_turn(self, completion_ids: list[int]) -> list[int]:
        """Ids to append after a completion so the assistant turn is closed: the eos when the model did not emit it."""
        return [] if completion_ids and completion_ids[-1] == self.eos_id else [self.eos_id]

    def user_turn(self, content: str) -> list[int]:
        """Ids that follow a closed assistant turn: the next user message and the assistant generation prompt."""
        return self.encode(self._user_head + content + self._user_tail)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
