"""Prompt templates: built-in templates, resolution rules, custom templates, errors."""

import json

import pytest

from latentembed.prompts import (
    TEMPLATES,
    PromptTemplate,
    ResolvedPrompt,
    TaskPrompt,
    get_template,
    resolve_prompt,
)


def test_builtin_template_names():
    assert set(TEMPLATES) == {"none", "nvembed", "e5", "instructor", "nomic", "jina-v3"}
    for name, t in TEMPLATES.items():
        assert t.name == name and get_template(name) is t


@pytest.mark.parametrize("name", ["nvembed", "e5"])
def test_instruct_query_templates(name):
    assert resolve_prompt(name, instruction="Find the answer") == ResolvedPrompt(
        "Instruct: Find the answer\nQuery: ", None
    )
    for task in ("retrieval", "sts", "classification", "clustering"):
        r = resolve_prompt(name, task=task)
        assert r.prefix.startswith("Instruct: ") and r.prefix.endswith("\nQuery: ")
        assert len(r.prefix) > len("Instruct: \nQuery: ") and r.adapter is None
    assert resolve_prompt(name, task="sts").prefix == "Instruct: Retrieve semantically similar text\nQuery: "
    assert resolve_prompt(name, task="document").prefix == ""
    # an explicit instruction overrides the task's; an empty one means no prefix
    assert resolve_prompt(name, task="sts", instruction="X").prefix == "Instruct: X\nQuery: "
    assert resolve_prompt(name, task="sts", instruction="").prefix == ""
    assert resolve_prompt(name, instruction={"instruction": "Y"}).prefix == "Instruct: Y\nQuery: "


def test_documents_have_no_prefix_by_default():
    for name in TEMPLATES:
        assert resolve_prompt(name) == ResolvedPrompt("", None)


def test_instructor():
    r = resolve_prompt(
        "instructor",
        instruction=dict(domain="Wikipedia", text_type="question", objective="retrieving supporting documents"),
    )
    assert r.prefix == "Represent the Wikipedia question for retrieving supporting documents: "
    # a plain string is the whole instruction
    assert resolve_prompt("instructor", instruction="Represent the title: ").prefix == "Represent the title: "
    for task in ("retrieval", "document", "sts", "classification", "clustering"):
        p = resolve_prompt("instructor", task=task).prefix
        assert p.startswith("Represent the ") and p.endswith(": ")
    with pytest.raises(ValueError, match=r"missing \['objective'\]"):
        resolve_prompt("instructor", instruction=dict(domain="a", text_type="b"))
    with pytest.raises(ValueError, match=r"unexpected \['topic'\]"):
        resolve_prompt("instructor", instruction=dict(domain="a", text_type="b", objective="c", topic="d"))


def test_nomic_prefixes():
    for task in ("search_query", "search_document", "classification", "clustering"):
        assert resolve_prompt("nomic", task=task) == ResolvedPrompt(task + ": ", None)
    assert resolve_prompt("nomic", instruction="search_query").prefix == "search_query: "


def test_jina_v3_tasks_select_adapters():
    tasks = {"retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"}
    assert set(TEMPLATES["jina-v3"].tasks) == tasks
    for task in tasks:
        assert resolve_prompt("jina-v3", task=task).adapter == task
    assert (
        resolve_prompt("jina-v3", task="retrieval.query").prefix
        == "Represent the query for retrieving evidence documents: "
    )
    assert resolve_prompt("jina-v3", task="retrieval.passage").prefix == "Represent the document for retrieval: "
    assert resolve_prompt("jina-v3", task="text-matching").prefix == ""
    # an explicit instruction keeps the task's adapter
    assert resolve_prompt("jina-v3", task="separation", instruction="Sep: ") == ResolvedPrompt("Sep: ", "separation")


def test_none_template_uses_instruction_verbatim():
    assert resolve_prompt("none", instruction="query: ").prefix == "query: "
    with pytest.raises(ValueError, match="known tasks: none"):
        resolve_prompt("none", task="retrieval")


def test_unknown_template_and_task_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown prompt template 'nvembedd'.*'e5'.*'nvembed'"):
        get_template("nvembedd")
    with pytest.raises(ValueError, match=r"unknown task 'retreival'.*'classification'.*'retrieval'"):
        resolve_prompt("nvembed", task="retreival")
    with pytest.raises(ValueError, match=r"retrieval\.passage"):
        resolve_prompt("jina-v3", task="retrieval")


def test_bad_argument_types():
    with pytest.raises(TypeError, match="instruction must be"):
        resolve_prompt("nvembed", instruction=3)
    with pytest.raises(TypeError, match="task must be"):
        resolve_prompt("nvembed", task=1)
    with pytest.raises(TypeError, match="template must be"):
        get_template(3)
    with pytest.raises(TypeError, match="TaskPrompt.prefix"):
        TaskPrompt(prefix=1)
    with pytest.raises(ValueError, match="only named fields"):
        PromptTemplate("x", "Do {} now")
    with pytest.raises(ValueError, match="non-empty"):
        PromptTemplate("")


def test_custom_template_and_dict_round_trip():
    t = PromptTemplate(
        "mine",
        "Task: {instruction}\n",
        {
            "qa": TaskPrompt("answer the question"),
            "doc": TaskPrompt(prefix="passage: ", adapter="docs"),
            "plain": {"instruction": "as a dict"},
        },
    )
    assert isinstance(t.tasks["plain"], TaskPrompt)
    assert resolve_prompt(t, task="qa") == ResolvedPrompt("Task: answer the question\n", None)
    assert resolve_prompt(t, task="doc") == ResolvedPrompt("passage: ", "docs")
    d = json.loads(json.dumps(t.to_dict()))
    assert PromptTemplate.from_dict(d) == t and get_template(d) == t
    assert hash(PromptTemplate.from_dict(d)) == hash(t)
    assert resolve_prompt(d, task="plain").prefix == "Task: as a dict\n"
    for builtin in TEMPLATES.values():  # every built-in round-trips
        assert PromptTemplate.from_dict(json.loads(json.dumps(builtin.to_dict()))) == builtin
    with pytest.raises(ValueError, match="unknown PromptTemplate keys"):
        PromptTemplate.from_dict({"name": "x", "format": "{instruction}"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        PromptTemplate.from_dict({"tasks": {}})
    with pytest.raises(ValueError, match="unknown TaskPrompt keys"):
        PromptTemplate.from_dict({"name": "x", "tasks": {"a": {"instr": "y"}}})


def test_templates_are_read_only():
    with pytest.raises(TypeError):
        TEMPLATES["nvembed"].tasks["new"] = TaskPrompt("x")
    with pytest.raises(AttributeError):
        TEMPLATES["nvembed"].name = "other"
