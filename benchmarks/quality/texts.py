"""Parsers for the raw formats the packages ship: fortune files, e-mails, WordNet data files, VADER ratings."""

from __future__ import annotations

import email
import html
import re
from email.message import Message
from pathlib import Path

MAX_CHARS = 1000  # the tokenizer keeps 128 tokens anyway; this bounds tokenization work on long e-mails

_FORTUNE_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def clean(text: str) -> str:
    """One line of single-spaced text, cut to MAX_CHARS: layout is noise for these tasks."""
    return " ".join(text.split())[:MAX_CHARS]


def decode(data: bytes, legacy: str) -> str:
    """UTF-8 (what current packages ship), else the language's legacy 8-bit encoding (older package versions)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(legacy)


def fortunes(path: Path, legacy: str = "latin-1") -> list[str]:
    """The fortunes of one strfile source file: entries separated by lines holding only `%`."""
    entries = _FORTUNE_SEPARATOR.split(decode(path.read_bytes(), legacy))
    return [text for text in map(clean, entries) if text]


def word_chunks(text: str, size: int) -> list[str]:
    """Consecutive chunks of exactly `size` words; a shorter tail is dropped so all chunks look alike."""
    words = text.split()
    return [" ".join(words[i : i + size]) for i in range(0, len(words) - size + 1, size)]


def _payload_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name in a header
        return payload.decode("latin-1")


def _strip_html(markup: str) -> str:
    return html.unescape(_TAG.sub(" ", _SCRIPT_OR_STYLE.sub(" ", markup)))


def email_text(raw: str) -> str:
    """Subject and body of a raw e-mail, without headers: plain-text parts, or HTML parts stripped of markup."""
    message = email.message_from_string(raw)
    parts = [p for p in message.walk() if not p.is_multipart()]
    plain = [_payload_text(p) for p in parts if p.get_content_type() == "text/plain"]
    body = plain if any(t.strip() for t in plain) else [
        _strip_html(_payload_text(p)) for p in parts if p.get_content_type() == "text/html"]
    return clean(f"{message.get('Subject', '')}\n" + "\n".join(body))


def wordnet_nouns(path: Path) -> list[tuple[int, str]]:
    """(lex_filenum, "words: gloss") per synset of a WordNet 3.0 data.noun file.

    A synset line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt ... | gloss`, w_cnt in
    hex; the license header lines start with two spaces.
    """
    synsets = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        words = [w.replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
        synsets.append((int(parts[1]), clean(f"{', '.join(words)}: {gloss}")))
    return synsets


def vader_ratings(path: Path) -> list[tuple[float, str]]:
    """(mean rating in [-4, 4], text) from a VADER `*_GroundTruth.txt` file: `id<TAB>rating<TAB>text`."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            _, rating, text = line.split("\t", 2)
            rows.append((float(rating), clean(text)))
    return rows
