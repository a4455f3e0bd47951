"""Instruction templates: turn (template, task, instruction) into the text prefix and LoRA adapter.

The prefix is prepended to each text before tokenisation (``tokenization.tokenize_with_prompts``
then excludes the prefix's tokens from pooling). Documents take no prefix by default: call
``resolve_prompt(template)`` with no task and no instruction and the prefix is ``""``.

Built-in templates (``TEMPLATES``):

- ``none``: an explicit instruction is the prefix, verbatim; no tasks.
- ``nvembed`` and ``e5``: ``"Instruct: {instruction}\\nQuery: "``; tasks retrieval, qa, sts,
  classification, clustering (instructions written for this package) and document (no prefix).
- ``instructor``: ``"Represent the {domain} {text_type} for {objective}: "`` from a mapping (a plain
  string is used as the whole prefix); tasks retrieval, document, sts, classification, clustering.
- ``nomic``: ``"{instruction}: "``; tasks search_query, search_document, classification, clustering
  (prefixes ``"search_query: "`` etc.).
- ``jina-v3``: tasks retrieval.query, retrieval.passage, separation, classification, text-matching,
  each selecting the LoRA adapter of the same name.

The two jina-v3 retrieval tasks also carry jina's task prompts. Example::

    >>> resolve_prompt("nvembed", task="sts").prefix
    'Instruct: Retrieve semantically similar text\\nQuery: '
    >>> resolve_prompt("nvembed", instruction="Find the answer").prefix
    'Instruct: Find the answer\\nQuery: '
    >>> resolve_prompt("instructor", instruction=dict(domain="medical", text_type="question",
    ...                objective="retrieval")).prefix
    'Represent the medical question for retrieval: '
    >>> resolve_prompt("jina-v3", task="retrieval.query")
    ResolvedPrompt(prefix='Represent the query for retrieving evidence documents: ', adapter='retrieval.query')
"""

from __future__ import annotations

import string
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "TaskPrompt",
    "PromptTemplate",
    "ResolvedPrompt",
    "TEMPLATES",
    "get_template",
    "resolve_prompt",
    "QUERY_TASKS",
    "DOCUMENT_TASKS",
    "role_task",
]


@dataclass(frozen=True)
class TaskPrompt:
    """One named task of a template.

    ``instruction`` is formatted through the template's ``instruction_format``; ``prefix`` is used
    verbatim (and wins over ``instruction``); ``adapter`` names the LoRA adapter the task selects.
    """

    instruction: str | None = None
    prefix: str | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        for name in ("instruction", "prefix", "adapter"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"TaskPrompt.{name} must be a str or None, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return {
            k: v
            for k, v in (("instruction", self.instruction), ("prefix", self.prefix), ("adapter", self.adapter))
            if v is not None
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskPrompt:
        if isinstance(d, TaskPrompt):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"a task must be a TaskPrompt or a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {"instruction", "prefix", "adapter"})
        if unknown:
            raise ValueError(f"unknown TaskPrompt keys {unknown}; expected instruction, prefix, adapter")
        return cls(**d)


def _format_fields(fmt: str) -> list[str]:
    """The named fields of a str.format string, in order (raises ValueError if malformed)."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"instruction_format {fmt!r} has field {{{name}}}; only named fields are allowed")
        if name not in fields:
            fields.append(name)
    return fields


@dataclass(frozen=True)
class PromptTemplate:
    """A family of prompts: how an instruction is written, and the named tasks.

    ``instruction_format`` is a ``str.format`` string. With the single field ``{instruction}`` a
    string instruction fills it; with other fields (INSTRUCTOR's ``{domain} {text_type}
    {objective}``) a mapping fills them and a plain string is used as the whole prefix.
    ``to_dict`` / ``from_dict`` round-trip (JSON-serialisable), for configs.

    Example::

        >>> t = PromptTemplate("mine", "Task: {instruction}\\n", {"qa": TaskPrompt("answer it")})
        >>> resolve_prompt(t, task="qa").prefix
        'Task: answer it\\n'
    """

    name: str
    instruction_format: str = "{instruction}"
    tasks: Mapping[str, TaskPrompt] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PromptTemplate.name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.instruction_format, str):
            raise TypeError(
                f"PromptTemplate.instruction_format must be a str, got {type(self.instruction_format).__name__}"
            )
        _format_fields(self.instruction_format)
        if not isinstance(self.tasks, Mapping):
            raise TypeError(f"PromptTemplate.tasks must be a mapping, got {type(self.tasks).__name__}")
        tasks = {}
        for key, task in self.tasks.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"task names must be non-empty str, got {key!r}")
            tasks[key] = TaskPrompt.from_dict(task)
        object.__setattr__(self, "tasks", types.MappingProxyType(tasks))

    def __hash__(self) -> int:
        return hash((self.name, self.instruction_format, tuple(self.tasks.items())))

    def __reduce__(self):
        # The read-only tasks view cannot be pickled or deep-copied itself (nor can a model
        # holding the template); rebuild from a plain dict instead.
        return (PromptTemplate, (self.name, self.instruction_format, dict(self.tasks)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PromptTemplate):
            return NotImplemented
        return (self.name, self.instruction_format, dict(self.tasks)) == (
            other.name,
            other.instruction_format,
            dict(other.tasks),
        )

    @property
    def fields(self) -> list[str]:
        """Named fields of ``instruction_format`` (``["instruction"]`` for most templates)."""
        return _format_fields(self.instruction_format)

    def format_instruction(self, instruction: str | Mapping[str, str]) -> str:
        """The prefix for an explicit instruction (see the class docstring). ``""`` gives ``""``."""
        fields = self.fields
        if isinstance(instruction, str):
            if instruction == "":
                return ""
            if fields == ["instruction"]:
                return self.instruction_format.format(instruction=instruction)
            return instruction  # a whole, already written instruction (e.g. INSTRUCTOR's)
        if isinstance(instruction, Mapping):
            missing = [f for f in fields if f not in instruction]
            extra = sorted(set(instruction) - set(fields))
            if missing or extra:
                raise ValueError(
                    f"template {self.name!r} formats {self.instruction_format!r}: the instruction "
                    f"mapping needs keys {fields}"
                    + (f", missing {missing}" if missing else "")
                    + (f", unexpected {extra}" if extra else "")
                )
            return self.instruction_format.format(**{k: str(v) for k, v in instruction.items()})
        raise TypeError(f"instruction must be a str, a mapping or None, got {type(instruction).__name__}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "instruction_format": self.instruction_format,
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptTemplate:
        if not isinstance(d, Mapping):
            raise TypeError(f"a template dict must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"name", "instruction_format", "tasks"})
        if unknown:
            raise ValueError(f"unknown PromptTemplate keys {unknown}; expected name, instruction_format, tasks")
        if "name" not in d:
            raise ValueError("a template dict needs a 'name'")
        return cls(
            name=d["name"],
            instruction_format=d.get("instruction_format", "{instruction}"),
            tasks=dict(d.get("tasks") or {}),
        )


@dataclass(frozen=True)
class ResolvedPrompt:
    """What a (template, task, instruction) resolves to: the text prefix and the adapter name."""

    prefix: str
    adapter: str | None


_INSTRUCT = "Instruct: {instruction}\nQuery: "
# Task instructions written for this package (NV-Embed / E5 use per-dataset instructions of this
# shape; any instruction can be passed explicitly).
_INSTRUCT_TASKS = {
    "retrieval": TaskPrompt("Given a question, retrieve passages that answer the question"),
    "qa": TaskPrompt("Given a question, retrieve the passage that contains its answer"),
    "sts": TaskPrompt("Retrieve semantically similar text"),
    "classification": TaskPrompt("Classify the given text by its topic"),
    "clustering": TaskPrompt("Identify the main topic of the given text"),
    "document": TaskPrompt(prefix=""),
}

TEMPLATES: dict[str, PromptTemplate] = {
    "none": PromptTemplate("none"),
    "nvembed": PromptTemplate("nvembed", _INSTRUCT, _INSTRUCT_TASKS),
    "e5": PromptTemplate("e5", _INSTRUCT, _INSTRUCT_TASKS),
    "instructor": PromptTemplate(
        "instructor",
        "Represent the {domain} {text_type} for {objective}: ",
        {
            "retrieval": TaskPrompt(prefix="Represent the question for retrieving supporting documents: "),
            "document": TaskPrompt(prefix="Represent the document for retrieval: "),
            "sts": TaskPrompt(prefix="Represent the sentence for finding semantically similar sentences: "),
            "classification": TaskPrompt(prefix="Represent the text for classifying its topic: "),
            "clustering": TaskPrompt(prefix="Represent the sentence for clustering by topic: "),
        },
    ),
    "nomic": PromptTemplate(
        "nomic",
        "{instruction}: ",
        {
            "search_query": TaskPrompt(prefix="search_query: "),
            "search_document": TaskPrompt(prefix="search_document: "),
            "classification": TaskPrompt(prefix="classification: "),
            "clustering": TaskPrompt(prefix="clustering: "),
        },
    ),
    "jina-v3": PromptTemplate(
        "jina-v3",
        "{instruction}",
        {
            "retrieval.query": TaskPrompt(
                prefix="Represent the query for retrieving evidence documents: ", adapter="retrieval.query"
            ),
            "retrieval.passage": TaskPrompt(
                prefix="Represent the document for retrieval: ", adapter="retrieval.passage"
            ),
            "separation": TaskPrompt(prefix="", adapter="separation"),
            "classification": TaskPrompt(prefix="", adapter="classification"),
            "text-matching": TaskPrompt(prefix="", adapter="text-matching"),
        },
    ),
}


def get_template(spec: str | Mapping[str, Any] | PromptTemplate) -> PromptTemplate:
    """A template from its built-in name, a ``to_dict()`` dict, or a PromptTemplate (returned as is).

    >>> get_template("e5").fields
    ['instruction']
    """
    if isinstance(spec, PromptTemplate):
        return spec
    if isinstance(spec, str):
        try:
            return TEMPLATES[spec]
        except KeyError:
            raise ValueError(f"unknown prompt template {spec!r}; known templates: {sorted(TEMPLATES)}") from None
    if isinstance(spec, Mapping):
        return PromptTemplate.from_dict(spec)
    raise TypeError(f"template must be a name, a dict or a PromptTemplate, got {type(spec).__name__}")


def resolve_prompt(
    template: str | Mapping[str, Any] | PromptTemplate,
    task: str | None = None,
    instruction: str | Mapping[str, str] | None = None,
) -> ResolvedPrompt:
    """Resolve the prefix and adapter for one task / instruction of ``template``.

    - ``instruction`` (explicit) overrides the task's instruction or prefix and is formatted through
      the template's ``instruction_format`` (an empty string means no prefix);
    - else the task's ``prefix`` is used verbatim, else its ``instruction`` is formatted;
    - neither task nor instruction: prefix ``""`` (documents are not prefixed by default).
    The adapter is the task's adapter (None without a task). Unknown task -> ValueError listing
    the template's tasks.

    >>> resolve_prompt("nomic", task="search_document")
    ResolvedPrompt(prefix='search_document: ', adapter=None)
    """
    tmpl = get_template(template)
    task_prompt = None
    if task is not None:
        if not isinstance(task, str):
            raise TypeError(f"task must be a str or None, got {type(task).__name__}")
        if task not in tmpl.tasks:
            known = sorted(tmpl.tasks)
            raise ValueError(
                f"unknown task {task!r} for prompt template {tmpl.name!r}; known tasks: "
                + (str(known) if known else "none (pass instruction= instead)")
            )
        task_prompt = tmpl.tasks[task]
    adapter = task_prompt.adapter if task_prompt is not None else None
    if instruction is not None:
        return ResolvedPrompt(tmpl.format_instruction(instruction), adapter)
    if task_prompt is None:
        return ResolvedPrompt("", None)
    if task_prompt.prefix is not None:
        return ResolvedPrompt(task_prompt.prefix, adapter)
    if task_prompt.instruction is not None:
        return ResolvedPrompt(tmpl.format_instruction(task_prompt.instruction), adapter)
    return ResolvedPrompt("", adapter)


#: The task that plays the query / the document side in each built-in template, first match
#: wins: what exporters (sentence-transformers' ``"query"`` / ``"document"`` prompts) and MTEB's
#: query / document prompt types map to.
QUERY_TASKS = ("retrieval", "search_query", "retrieval.query")
DOCUMENT_TASKS = ("document", "search_document", "retrieval.passage")


def role_task(template: str | Mapping[str, Any] | PromptTemplate, role: str) -> str | None:
    """The task of ``template`` for ``role`` (``"query"`` or ``"document"``), or ``None`` when
    the template has none (documents then take no prompt; queries none either).

    >>> role_task("nomic", "query"), role_task("e5", "document"), role_task("none", "query")
    ('search_query', 'document', None)
    """
    names = {"query": QUERY_TASKS, "document": DOCUMENT_TASKS}
    if role not in names:
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    tasks = get_template(template).tasks
    return next((t for t in names[role] if t in tasks), None)
