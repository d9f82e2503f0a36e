"""jsonargparse's refusals of a value, as one line that names the option, the value and what it takes.

A value that fits none of an option's types (`--trainer.precision 8`, `--model.g_optimizer.lr fast`) comes back
from jsonargparse as a multi-line dump of every type it tried ("Does not validate against any of the Union
subtypes ..."), with the reason somewhere inside; a callback whose constructor refused a value
(`--trainer.callbacks.every_n_epochs -3`) comes back the same way, as a traceback. `summarize` reads the dump.
"""

from __future__ import annotations

import re

_TYPE_WORDS = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string", "NoneType": "null"}
_STRUCTURE = ("Subtypes:", "Errors:", "Given value type:", "Given value:", "Subclass types expect")
_NOISE = (  # a type that was tried and did not fit, or the list of ways a class can be given
    "Does not validate against any of the Union subtypes",
    "Expected a path but",
    "Expected a dot import path string",
    "Not a valid subclass of",
    "Problem with given class_path",
    "a class path (str)",
    "a dict with",
    "Import path",
)


def _allowed(reason: str) -> list[str] | None:
    """What a type-mismatch reason says the option takes ("Expected a <class 'int'>" -> ["an integer"]), or
    None when the reason says something else."""
    if m := re.fullmatch(r"Expected a (<class '\w+'>|typing\.Literal\[.*\])\.?", reason):
        return _words(m[1])
    return None


def _words(types: str) -> list[str]:
    """["an integer", "null"] for "<class 'int'>, <class 'NoneType'>"; a Literal's values as they are."""
    words: list[str] = []
    for literal, name in re.findall(r"typing\.Literal\[([^\]]*)\]|<class '([\w.]+)'>", types):
        if name == "torch.Tensor":  # an optimizer's lr or betas may be tensors: nobody types one
            continue
        values = [v.strip().strip("'\"") for v in literal.split(",")] if literal else [_TYPE_WORDS.get(name, name)]
        words += [v for v in values if v not in words]
    return words


def _subtypes(message: str) -> list[str] | None:
    """The allowed values from the innermost (last) "Subtypes: [...]" list when it holds only literals and plain
    classes (--trainer.precision, --data.on_device), else None."""
    found = re.findall(r"^\s*Subtypes: \[(.*)\]\s*$", message, re.MULTILINE)
    if not found:
        return None
    rest = re.sub(r"typing\.Literal\[[^\]]*\]|<class '[\w.]+'>|[\s,]", "", found[-1])
    return _words(found[-1]) if not rest else None


def _given(message: str) -> str | None:
    """The value the user gave, as the dump shows it (innermost first)."""
    if m := re.search(r"NestedArg\(key='[^']*', val=(.*)\)\s*$", message, re.MULTILINE):
        return m[1].strip().strip("'\"")
    if m := re.search(r"^\s*Given value: (.*?)(?:\. Got value: .*)?$", message, re.MULTILINE):
        return m[1].strip()
    if m := re.search(r"Got value: (.*)$", message, re.MULTILINE):
        return m[1].strip()
    return None


def summarize(message: str, key: str | None = None) -> str | None:
    """One line for a jsonargparse union refusal: `--KEY VALUE: REASON` where the dump names a reason, else
    `--KEY VALUE is not valid: expected ALLOWED`; None when the message is not such a dump (keep it as is).
    `key` is used when the message names none (a refusal while building the classes)."""
    if "Does not validate against any of the Union subtypes" not in message and "Parser key" not in message:
        return None
    keys = re.findall(r'Parser key "([^"]+)"|NestedArg\(key=\'([^\']+)\'', message)
    keys = [outer or nested for outer, nested in keys]
    key = ".".join(dict.fromkeys(keys)) if keys else key
    reasons: list[str] = []
    allowed: list[str] = []
    for line in message.splitlines():
        text = re.sub(r"^Type .* expects a function or a callable class: ", "", line.strip().removeprefix("- "))
        text = re.sub(r'Parser key "[^"]+":', "", text).strip().removeprefix("- ").strip()
        if not text or text.startswith(_STRUCTURE) or text.startswith(_NOISE):
            continue
        text = re.sub(r" Got value: .*$", "", text).strip()
        words = _allowed(text)
        if words is not None:
            allowed += [w for w in words if w not in allowed]
        else:
            text = text[0].lower() + text[1:] if text[:2] != text[:2].upper() else text  # "Option" -> "option"
            reasons += [] if text in reasons else [text]
    allowed = _subtypes(message) or allowed
    if not reasons and not allowed:
        return None
    value = _given(message)
    option = f"--{key}" if key else "a setting"
    said = f"{option} {value}" if value is not None and len(value) <= 60 else option
    if "torch.optim.optimizer.Optimizer" in message and len(set(keys)) == 1:  # the class itself, not an init arg
        reasons.append("give an optimizer class, e.g. torch.optim.Adam")
    if key and key.startswith("trainer.callbacks") and any("is not accepted" in r for r in reasons):
        last = re.search(r"class_path '[\w.]*?(\w+)'", message)
        reasons.append(
            f"--trainer.callbacks.OPTION sets the last callback listed{f' ({last[1]})' if last else ''}: set "
            "another callback's options under trainer.callbacks in a config file"
        )
    if reasons:
        return f"{said}: {'; '.join(reasons)}"
    listing = ", ".join(allowed[:-1]) + (" or " if len(allowed) > 1 else "") + allowed[-1]
    return f"{said} is not valid: use {listing}"
