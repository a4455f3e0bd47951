"""A retrieval set from a Wikipedia XML dump, in TREC Complex Answer Retrieval style.

Each level-2 section of an article becomes a row: query ``"<article title>: <section heading>"``,
relevant passage the section's first paragraph (wiki markup removed), hard negatives the first
paragraphs of the article's other sections (same topic, other aspect).

Articles are split by a fixed rule, so that every run, everywhere, holds out the same ones:
an article is a test article iff the first two hex digits of ``sha256(title.encode("utf-8"))``,
read as an integer, are below :data:`TEST_THRESHOLD` (77 of 256: about 30 %). Nothing from a test
article is ever trained on (split by article, never by row: rows of one article share its words).
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator

__all__ = [
    "TEST_THRESHOLD",
    "SKIPPED_SECTIONS",
    "MIN_CHARS",
    "pages",
    "clean",
    "sections",
    "build_rows",
    "is_test_article",
    "split_by_rule",
    "beir_set",
]

#: An article is held out for testing iff int(sha256(title)[:2], 16) < TEST_THRESHOLD.
TEST_THRESHOLD = 77

#: Sections that hold lists of links or sources, not prose about the article's subject.
SKIPPED_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "works cited",
    "gallery",
}
MIN_CHARS = 80  # a first paragraph shorter than this is a caption or a stub


def pages(xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article of a MediaWiki XML dump (namespace 0, no redirects)."""
    root_ns = ""
    for _, el in ET.iterparse(io.BytesIO(xml), events=("end",)):
        tag = el.tag
        if tag.endswith("}page"):
            root_ns = tag[: -len("page")]
            title = el.findtext(f"{root_ns}title") or ""
            namespace = el.findtext(f"{root_ns}ns") or "0"
            text = el.findtext(f"{root_ns}revision/{root_ns}text") or ""
            el.clear()
            if namespace == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """Remove every (possibly nested) ``opening ... closing`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _drop_file_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Image:...]]`` and ``[[Category:...]]`` (captions hold links)."""
    pattern = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
    while (m := pattern.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]
    return text


def clean(wikitext: str) -> str:
    """Plain text of a wikitext fragment: comments, references, templates, tables, files and
    tags removed; links and external links replaced by their text; bold / italics unquoted."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _drop_file_links(text)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[?https?://\S+\]?", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("'''", "").replace("''", "")
    text = html.unescape(text)
    return re.sub(r"\s+", " ", text).strip()


def sections(wikitext: str) -> list[tuple[str, str]]:
    """(heading, first paragraph) of every level-2 section with a prose first paragraph of at
    least :data:`MIN_CHARS` characters (lists, tables and templates are not paragraphs)."""
    parts = re.split(r"^==([^=].*?)==\s*$", wikitext, flags=re.M)
    out = []
    for heading, body in zip(parts[1::2], parts[2::2]):
        heading = clean(heading)
        if not heading or heading.lower() in SKIPPED_SECTIONS:
            continue
        body = re.split(r"^=", body, maxsplit=1, flags=re.M)[0]  # up to the first subsection
        body = _drop_file_links(
            _drop_nested(_drop_nested(re.sub(r"<!--.*?-->", "", body, flags=re.S), "{{", "}}"), "{|", "|}")
        )
        for block in re.split(r"\n\s*\n", body):
            block = block.strip()
            if not block or block[0] in "*#:;|!{":
                continue
            paragraph = clean(block)
            if len(paragraph) >= MIN_CHARS:
                out.append((heading, paragraph))
            break
    return out


def build_rows(dump: bytes, max_negatives: int = 3, min_sections: int = 3) -> list[dict]:
    """One row per section of every article with at least ``min_sections`` usable sections:
    ``{"query", "positive", "negatives", "article"}`` (up to ``max_negatives`` other sections)."""
    rows = []
    for title, text in pages(dump):
        found = sections(text)
        if len(found) < min_sections:
            continue
        for i, (heading, paragraph) in enumerate(found):
            others = [p for j, (_, p) in enumerate(found) if j != i and p != paragraph]
            rows.append(
                {
                    "query": f"{title}: {heading}",
                    "positive": paragraph,
                    "negatives": others[:max_negatives],
                    "article": title,
                }
            )
    return rows


def is_test_article(title: str) -> bool:
    """The split rule (module docstring): True for a held-out (test) article.

    Example:
        >>> is_test_article("Algeria"), int(hashlib.sha256(b"Algeria").hexdigest()[:2], 16)
        (True, 48)
        >>> is_test_article("Aristotle"), int(hashlib.sha256(b"Aristotle").hexdigest()[:2], 16)
        (False, 169)
    """
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:2], 16) < TEST_THRESHOLD


def split_by_rule(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test) rows of :func:`build_rows`, whole articles on each side by :func:`is_test_article`."""
    test = [r for r in rows if is_test_article(r["article"])]
    return [r for r in rows if not is_test_article(r["article"])], test


def beir_set(rows: list[dict]) -> tuple[dict, dict, dict]:
    """(corpus, queries, qrels) of held-out rows: every section paragraph of their articles."""
    corpus, ids, queries, qrels = {}, {}, {}, {}
    for i, row in enumerate(rows):
        for text in [row["positive"], *row["negatives"]]:
            if text not in ids:
                ids[text] = f"d{len(ids)}"
                corpus[ids[text]] = text
        queries[f"q{i}"] = row["query"]
        qrels[f"q{i}"] = {ids[row["positive"]]: 1}
    return corpus, queries, qrels
