"""A documented, deterministic stand-in tokenizer and synthetic output text.

The testbed runs no model, so it needs no real vocabulary; what it needs is a token count
that anyone can reproduce from the text alone (see docs/api.md):

* Text is split by the regex ``\\w+|[^\\w\\s]``: runs of word characters (letters, digits,
  underscore, any script) and single punctuation/symbol characters. Whitespace is dropped.
* A word longer than 4 characters is split every 4 characters ("tokenizer" -> "toke",
  "nize", "r"); a word of n characters is ``ceil(n / 4)`` tokens.
* Chat messages are rendered with ``CHAT_TEMPLATE`` (one ``<|role|>`` header line and the
  content per message, then ``<|assistant|>``) and the rendered text is counted.

Generated text is synthetic: token ``i`` of request ``r`` is a word of at most 4 lowercase
letters picked by a hash of ``(r, i)``, preceded by a space except for the first token.
Every generated token is therefore exactly one token under the rule above, and the text of
n generated tokens counts as n tokens.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Mapping

WORD_PIECE = 4
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# One header line per message; the final header is where the model's answer would start.
CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
CHAT_GENERATION_PROMPT = "<|assistant|>\n"

# 256 short English words (<= 4 letters each) for synthetic output.
WORDS: tuple[str, ...] = tuple("""
a able acid age ago aid aim air all also am an and any arc area arm art as ask at atom
away axis baby back bad bag ball band bank base be bear beat bed bell best big bird bit
blue boat body bone book born both box boy bulk busy but by call calm camp can card care
case cell city clay coal code cold come cook cool copy core cost crew cut dark data date
day deal deep desk dial disk do door down draw drop dry dual dust duty each earn east easy
edge else even ever face fact fair fall far farm fast fear feed feel few file fill film
find fine fire firm fish five flat flow fold food foot form four free from fuel full fund
gain game gate gave gear gift give glad goal gold good grid grow half hall hand hard have
head hear heat help here high hill hold home hope host hour huge idea if in into iron is
it item join just keep key kind king know lake land last late lead left less life lift
like line link list live load long look loop lost low made mail main make many map mark
mass may mean meet mild mind mode more most move much must name near need net new next
nice node note now of off oil old on once one only open or our out over own pace page
pair park part pass past path peak pick plan play plot port
""".split())
assert len(WORDS) == 256 and all(len(w) <= WORD_PIECE for w in WORDS)


def tokenize(text: str) -> list[str]:
    """The token strings of ``text`` under the documented rule."""
    tokens: list[str] = []
    for match in _TOKEN_RE.finditer(text):
        word = match.group()
        if len(word) <= WORD_PIECE:
            tokens.append(word)
        else:
            tokens.extend(word[i:i + WORD_PIECE] for i in range(0, len(word), WORD_PIECE))
    return tokens


def count_tokens(text: str) -> int:
    """Number of tokens of ``text``; same as ``len(tokenize(text))`` without building lists."""
    n = 0
    for match in _TOKEN_RE.finditer(text):
        n += -(-(match.end() - match.start()) // WORD_PIECE)
    return n


def message_text(content: Any) -> str:
    """The text of a chat message's ``content``: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("content parts must be objects {\"type\": \"text\", \"text\": string}")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError("content must be a string, null or a list of text parts")


def render_chat(messages: Iterable[Mapping[str, Any]]) -> str:
    """Render chat messages to the prompt text that is counted (``CHAT_TEMPLATE``)."""
    rendered = [CHAT_TEMPLATE.format(role=m["role"], content=message_text(m.get("content")))
                for m in messages]
    rendered.append(CHAT_GENERATION_PROMPT)
    return "".join(rendered)


def count_chat_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    return count_tokens(render_chat(messages))


def synthetic_word(request_id: str, index: int) -> str:
    """The word of output token ``index`` of ``request_id`` (stable across processes)."""
    digest = hashlib.blake2b(f"{request_id}:{index}".encode(), digest_size=1).digest()
    return WORDS[digest[0]]


def token_text(request_id: str, index: int) -> str:
    """The text of output token ``index`` as streamed: the word, space-separated from the previous."""
    word = synthetic_word(request_id, index)
    return word if index == 0 else " " + word


def synthetic_text(request_id: str, tokens: int) -> str:
    """The whole synthetic output of ``tokens`` tokens (what a client reassembles)."""
    return "".join(token_text(request_id, i) for i in range(tokens))


def synthetic_prompt(tokens: int, seed: str = "prompt") -> str:
    """A prompt text of exactly ``tokens`` tokens (for load generators and tests)."""
    return synthetic_text(seed, tokens)
