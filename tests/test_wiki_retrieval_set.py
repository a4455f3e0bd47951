"""scripts/wiki_retrieval_set.py on a small made-up MediaWiki dump: sections become rows
("title: heading" -> first paragraph, other sections as negatives), markup is removed, redirects,
other namespaces and link sections are skipped, and the split never puts one article on both
sides; what it writes is what the trainer and the eval command read."""

import bz2
import importlib.util
import json
from pathlib import Path

from latentembed.training.data import load_eval_set, read_examples, split_examples

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wiki_retrieval_set.py"
LONG = "is described here at enough length to count as a paragraph of prose about its subject"


def _script():
    spec = importlib.util.spec_from_file_location("wiki_retrieval_set", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(title: str, text: str, ns: int = 0) -> str:
    return f"<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>"


def _article(name: str, n: int) -> str:
    body = f"{{{{Infobox|name={name}}}}}\n'''{name}''' is an article.\n"
    for i in range(n):
        body += (
            f"\n== Part {i} ==\n{{{{Main|Other}}}}\n[[File:X.jpg|thumb|a [[caption]] link]]\n"
            f"The [[part (thing)|part]] {i} of ''{name}'' {LONG}.&lt;ref&gt;A source&lt;/ref&gt; "
            f"See [https://example.org the site].\n\nA second paragraph.\n"
        )
    body += "\n== See also ==\n* [[Something]] and a long list item that is not prose at all, really not\n"
    return body


def _dump(articles: dict) -> bytes:
    pages = [_page(name, _article(name, n)) for name, n in articles.items()]
    pages.append(_page("Redirected", "#REDIRECT [[Alpha]]"))
    pages.append(_page("Talk:Alpha", _article("Talk", 4), ns=1))
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    return xml.encode("utf-8")


def test_rows_from_sections_with_markup_removed():
    wiki = _script()
    rows = wiki.build_rows(_dump({"Alpha": 4, "Beta": 3, "Gamma": 2}), max_negatives=2)
    assert {r["article"] for r in rows} == {"Alpha", "Beta"}  # Gamma: too few sections
    assert [r["query"] for r in rows if r["article"] == "Alpha"] == [f"Alpha: Part {i}" for i in range(4)]
    first = rows[0]
    assert first["positive"] == f"The part 0 of Alpha {LONG}. See the site."
    assert len(first["negatives"]) == 2 and all(n.startswith("The part ") for n in first["negatives"])
    assert first["positive"] not in first["negatives"]
    assert not any(c in r["positive"] for r in rows for c in "[]{}<>'")


def test_the_written_files_split_by_article_and_load(tmp_path):
    wiki = _script()
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(_dump({f"Article {i}": 3 + i % 3 for i in range(10)})))
    assert wiki.main([str(dump), str(tmp_path / "set"), "--eval-articles", "0.3", "--seed", "1"]) == 0
    train = [json.loads(line) for line in (tmp_path / "set" / "train.jsonl").read_text().splitlines()]
    held = load_eval_set(tmp_path / "set" / "heldout")
    held_articles = {q.split(":")[0] for q in held.queries.values()}
    train_articles = {r["query"].split(":")[0] for r in train}
    assert len(held_articles) == 3 and held_articles.isdisjoint(train_articles) and len(train_articles) == 7
    assert all(set(r) == {"query", "positive", "negatives"} for r in train)
    assert all(len(grades) == 1 for grades in held.qrels.values())
    rows = read_examples(tmp_path / "set" / "rows.jsonl", group_key="article")
    kept, out = split_examples(rows, 0.3, seed=0, by_group=True)
    assert {ex.group for ex in kept}.isdisjoint({ex.group for ex in out})
