"""BM25 (Okapi), the standard lexical baseline, in a few lines: no dependency, exact scores.

Score of document ``d`` for query ``q``::

    sum over query terms t in d:  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(Lucene's idf, always positive; ``k1 = 1.2``, ``b = 0.75``). Text is lowercased and split into
runs of letters and digits; a query term counts once per occurrence in the query.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping

__all__ = ["tokenize_words", "BM25"]

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize_words(text: str) -> list[str]:
    """Lowercased runs of letters and digits (``\\w+``)."""
    return _WORD.findall(text.lower())


class BM25:
    """An index over ``corpus`` (doc id -> text) that ranks it for a query.

    Example:
        >>> index = BM25({"d1": "the cat sat", "d2": "dogs bark at night", "d3": "a cat and a dog"})
        >>> [doc for doc, _ in index.search("cat", k=2)]
        ['d1', 'd3']
    """

    def __init__(self, corpus: Mapping[str, str], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.ids = list(corpus)
        self.tf = [Counter(tokenize_words(corpus[i])) for i in self.ids]
        self.length = [sum(c.values()) for c in self.tf]
        self.avgdl = sum(self.length) / max(len(self.length), 1) or 1.0
        df = Counter(t for c in self.tf for t in c)
        n = len(self.ids)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.postings: dict[str, list[int]] = {}
        for j, c in enumerate(self.tf):
            for t in c:
                self.postings.setdefault(t, []).append(j)

    def scores(self, query: str) -> dict[str, float]:
        """BM25 score of every document that shares a term with ``query`` (others score 0)."""
        out: dict[int, float] = {}
        for t in tokenize_words(query):
            idf = self.idf.get(t)
            if idf is None:
                continue
            for j in self.postings[t]:
                f = self.tf[j][t]
                norm = self.k1 * (1 - self.b + self.b * self.length[j] / self.avgdl)
                out[j] = out.get(j, 0.0) + idf * f * (self.k1 + 1) / (f + norm)
        return {self.ids[j]: s for j, s in out.items()}

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best (doc id, score), best first (ties: corpus order)."""
        order = {d: i for i, d in enumerate(self.ids)}
        ranked = sorted(self.scores(query).items(), key=lambda x: (-x[1], order[x[0]]))
        return ranked[:k]
