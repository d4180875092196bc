"""Class names and prompt templates: the built-in sets and user files.

Built-in sets live in `mmcl/evaluation/prompts/<name>.json` as
`{"classnames": [...], "templates": [...], "source": "..."}`:
  imagenet1k  1,000 ImageNet class names + the 80 OpenAI templates (from open_clip)
  cifar10     CIFAR-10 class names + the 18 CLIP templates
  cifar100    CIFAR-100 class names + the 18 CLIP templates
  digits      the demo digits dataset (data_tools/demo_dataset.py)

A template holds the class name as `{c}` (CLIP_benchmark's form) or `{}`. Class-specific
prompts (CuPL style) are a dict `{classname: [prompt, ...]}` with the prompts written out.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

BUILTIN_DIR = "prompts"


def builtin_prompt_sets() -> list[str]:
    """Names of the built-in prompt sets (e.g. ['cifar10', 'cifar100', 'digits', 'imagenet1k'])."""
    folder = resources.files("mmcl.evaluation").joinpath(BUILTIN_DIR)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_builtin(name: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a built-in set."""
    if name not in builtin_prompt_sets():
        raise ValueError(f"unknown built-in prompt set '{name}'; choose one of {', '.join(builtin_prompt_sets())}.")
    text = resources.files("mmcl.evaluation").joinpath(BUILTIN_DIR, f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return list(data["classnames"]), list(data["templates"])


def read_list_file(path: str | Path, what: str) -> list[str] | dict[str, list[str]]:
    """Read class names or templates from a user file.

    `.json`: a list of strings, a `{"classnames"|"templates": [...]}` object, or (templates
    only) a CuPL-style `{classname: [prompt, ...]}` dict. Anything else: plain text, one
    entry per non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        items = [line.strip() for line in text.splitlines() if line.strip()]
        if not items:
            raise ValueError(f"{what} file {path} has no entries.")
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} file {path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    if isinstance(data, dict) and what in data:
        data = data[what]
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return list(data)
    if (
        what == "templates"
        and isinstance(data, dict)
        and data
        and all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in data.values())
    ):
        return {str(k): list(v) for k, v in data.items()}
    raise ValueError(f"{what} file {path} must hold a non-empty list of strings" + (" or a {classname: [prompts]} dict." if what == "templates" else "."))


def fill_template(template: str, classname: str) -> str:
    """Put `classname` into `template` at `{c}` or `{}` (plain replacement: braces in names are safe)."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template '{template}' has no '{{c}}' or '{{}}' placeholder for the class name.")


def expand_prompts(
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
) -> tuple[list[str], list[int]]:
    """All prompt texts and, for each, its class index.

    templates: shared templates (every class gets every template), or a dict class name ->
    prompts (CuPL style; every class must have at least one prompt).
    Returns (texts [P], class_ids [P]) with the prompts of class 0 first, then class 1, ...
    """
    if not classnames:
        raise ValueError("the list of class names is empty.")
    texts: list[str] = []
    class_ids: list[int] = []
    if isinstance(templates, Mapping):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise ValueError(f"the class-specific prompts have no entry for {len(missing)} class(es), e.g. '{missing[0]}'.")
        for index, name in enumerate(classnames):
            texts.extend(templates[name])
            class_ids.extend([index] * len(templates[name]))
        return texts, class_ids
    if not templates:
        raise ValueError("the list of templates is empty.")
    for index, name in enumerate(classnames):
        texts.extend(fill_template(t, name) for t in templates)
        class_ids.extend([index] * len(templates))
    return texts, class_ids
