"""RabbitMQ topic-exchange matching, pure: which routing keys a binding pattern catches.

The rules are RabbitMQ's own (``rabbit_exchange_type_topic``), checked against
the real broker in ``tests/test_topic.py``:

- a key and a pattern are split into words on ``.``; the empty string has no
  words at all, and ``a.`` has two (``a`` and the empty word);
- ``*`` matches exactly one word (possibly the empty word, never no word);
- ``#`` matches zero or more words, so ``a.#`` matches ``a`` and ``#.a``
  matches ``a``;
- anything else matches only the same word; ``*`` or ``#`` inside a longer word
  is a literal character.

The Explorer page does the same in JavaScript (``bridge/explorer/static/app.js``);
both are run on the same cases in the tests.
"""

from __future__ import annotations

from functools import lru_cache

from bridge.catalog import CATALOG, KNOWN_CHANNELS

__all__ = ["documented_matches", "matches", "pattern_problem", "words"]

MAX_BYTES = 255
"""RabbitMQ's limit for a routing key and a binding key (a short string)."""


def words(key: str) -> tuple[str, ...]:
    """Split a routing key or pattern into words as RabbitMQ does (``""`` has none)."""
    return () if key == "" else tuple(key.split("."))


def matches(pattern: str, key: str) -> bool:
    """Whether a binding ``pattern`` catches the routing ``key`` on a topic exchange."""
    return _match(words(pattern), words(key))


@lru_cache(maxsize=4096)
def _match(pat: tuple[str, ...], key: tuple[str, ...]) -> bool:
    # reach[j]: the first i pattern words can consume the first j key words.
    reach = [True] + [False] * len(key)
    for word in pat:
        if word == "#":
            # zero or more words: once reachable, every later position is too
            seen = False
            for j in range(len(key) + 1):
                seen = seen or reach[j]
                reach[j] = seen
        else:
            nxt = [False] * (len(key) + 1)
            for j in range(1, len(key) + 1):
                nxt[j] = reach[j - 1] and (word == "*" or word == key[j - 1])
            reach = nxt
    return reach[len(key)]


def pattern_problem(pattern: str) -> str | None:
    """Why a binding pattern is refused as configuration, or None when it is fine.

    RabbitMQ itself accepts any short string; this refuses the ones that are
    almost surely mistakes: empty, too long, whitespace or control characters, an
    empty word, and ``*`` or ``#`` glued to other characters (``transaction*`` is a literal
    word for RabbitMQ and would catch nothing).
    """
    if pattern == "":
        return "is empty (use # for every event)"
    if len(pattern.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"is longer than {MAX_BYTES} bytes"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in pattern):
        return "holds whitespace or a control character"
    if "" in pattern.split("."):
        # The bridge never publishes a name with an empty word (it quarantines one), so such a
        # pattern would catch nothing: almost surely a typo (transaction..done).
        return "has an empty word (two dots, or a dot at an end): no event name has one, so it would catch nothing"
    for word in words(pattern):
        if word not in ("*", "#") and ("*" in word or "#" in word):
            return f"has the word {word!r}: * and # are wildcards only as a whole word"
    return None


def documented_matches(pattern: str) -> tuple[str, ...]:
    """The catalogue's event names a pattern catches (``CHANNEL.message.*`` for any channel)."""
    out: list[str] = []
    for spec in CATALOG:
        if spec.name.startswith("CHANNEL."):
            rest = spec.name.removeprefix("CHANNEL")
            candidates = [spec.name, *(ch + rest for ch in sorted(KNOWN_CHANNELS))]
        else:
            candidates = [spec.name]
        if any(matches(pattern, name) for name in candidates):
            out.append(spec.name)
    return tuple(out)
