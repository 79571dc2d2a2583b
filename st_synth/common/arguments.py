"""Settings from the command line and from YAML, parsed once, from the stage dataclasses themselves.

Each stage's settings are one dataclass whose fields carry their default and help text (``GenerationConfig``,
``ConsistencyFilter``, the recipe's ``ModelArguments`` / ``DataArguments`` / ``LossArguments`` /
``OutputArguments`` / ``RecipeTrainingArguments``, ``EvaluationArguments``, ``RunArguments``). A
:class:`SettingsParser` (transformers' ``HfArgumentParser``) builds the flags of every ``st-synth``
subcommand and of ``recipes/train_mistral.py`` from them, and reads a YAML section through the same flags
(:meth:`SettingsParser.parse_settings`), so a field has one name, one type and one default everywhere.

Renamed settings keep their old spelling, with a FutureWarning naming the new one (:data:`RENAMED`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

# Old name -> new name. A flag or YAML key spelled the old way is read as the new one, with a FutureWarning.
RENAMED: dict[str, str] = {
    "price_prompt": "price_prompt_per_million",
    "price_completion": "price_completion_per_million",
    "local_backend": "llm_backend",
    "no_progress": "no_show_progress",
    "instruction": "task_instructions",
}
# Old switches that became a value of another setting: old name -> (new name, value when on, value when off).
REPLACED_SWITCHES: dict[str, tuple[str, str, str]] = {
    "length_grouping": ("batch_sampler", "length_grouped", "no_duplicates"),
}
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def decode_json(value: Any, name: str) -> Any:
    """A setting given as a JSON list or object in one string (a YAML list or mapping passed as a flag, or
    typed by hand) as the list or dict; any other value as it is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{name}: {value!r} is neither a list of names nor valid JSON ({error.msg})."
            ) from None
    return value


class SettingsError(ValueError):
    """A setting that does not parse (from YAML: raised instead of argparse's exit)."""


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(f"The setting '{old}' is now called '{new}'; the old name still works, for now.",
                  FutureWarning, stacklevel=4)  # fmt: skip


_CHECKPOINTING_RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


@functools.cache
def _setting_renames() -> dict[str, str]:
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    fields = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    if "activation_checkpointing" in fields:
        return _CHECKPOINTING_RENAMES
    return {new: old for old, new in _CHECKPOINTING_RENAMES.items()}


def current_setting_name(name: str) -> str:
    """``name`` as the installed transformers spells it (old and new checkpointing names either way)."""
    return _setting_renames().get(name, name)


def _checkpointing_name(name: str) -> str:
    """transformers' checkpointing settings under the installed release's names (any other name as it is,
    without importing the training stack: `st-synth generate` starts without torch)."""
    if "checkpointing" not in name:
        return name
    return current_setting_name(name)


def translate_flags(argv: Iterable[str]) -> list[str]:
    """Command-line flags with renamed settings under their current names (warning for each old one), and
    the checkpointing settings as the installed transformers spells them."""
    argv, out = list(argv), []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        flag, eq, value = arg.partition("=")
        if not flag.startswith("--") or flag == "--":
            out.append(arg)
            continue
        name = flag[2:].replace("-", "_")
        negated = name.startswith("no_") and name[3:] in REPLACED_SWITCHES
        switch = name[3:] if negated else name
        if switch in REPLACED_SWITCHES:
            new, on, off = REPLACED_SWITCHES[switch]
            if not negated and not eq and index < len(argv) and argv[index].lower() in _TRUE + _FALSE:
                value, eq = argv[index], "="
                index += 1
            enabled = not negated and (not eq or value.lower() in _TRUE)
            _warn_renamed(name, f"{new} {on if enabled else off}")
            out += [f"--{new}", on if enabled else off]
            continue
        if name in RENAMED:
            _warn_renamed(name, RENAMED[name])
            name = RENAMED[name]
        out.append(f"--{_checkpointing_name(name)}{eq}{value}")
    return out


class SettingsParser(HfArgumentParser):
    """``HfArgumentParser`` for st-synth's stage dataclasses.

    - A field may give ``metadata={"flag_type": str}`` when its Python type is richer than one flag can
      say (``GenerationConfig.kinds`` takes a string, a list or a mapping in Python; one string as a flag;
      YAML lists and mappings arrive as JSON).
    - ``metadata={"positional": NARGS}`` makes a field positional (NARGS: ``None`` for exactly one, ``"?"``,
      ``"+"``), ``metadata={"repeatable": True}`` a flag given once per value (``--set A --set B``). (Not
      ``nargs`` / ``action``: transformers' own fields carry those for ``HfArgumentParser``.)
    - Renamed flags are read under their new names (:func:`translate_flags`).
    - :meth:`parse_settings` reads a mapping (a YAML section) through the same flags.
    """

    def __init__(self, dataclass_types: Any = None, **kwargs: Any) -> None:
        self._raise_errors = False
        super().__init__(dataclass_types or [], **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser: Any, field: dataclasses.Field) -> None:
        metadata = dict(field.metadata)
        if "positional" in metadata or metadata.get("repeatable"):  # st-synth's own: see the class docstring
            if "positional" in metadata:
                name, kwargs = field.name, {"nargs": metadata["positional"]}
            else:
                name, kwargs = f"--{field.name}", {"action": "append"}
            if field.default_factory is not dataclasses.MISSING:
                kwargs["default"] = field.default_factory()
            elif field.default is not dataclasses.MISSING:
                kwargs["default"] = field.default
            elif name.startswith("--"):
                kwargs["required"] = True  # (a positional without a default is required as it is)
            if "metavar" in metadata:
                kwargs["metavar"] = metadata["metavar"]
            parser.add_argument(name, help=metadata.get("help"), **kwargs)
            return
        if "flag_type" in metadata:
            field = copy.copy(field)
            field.type = metadata.pop("flag_type")
        if "%" in metadata.get("help", "") and "%(" not in metadata["help"]:
            metadata["help"] = metadata["help"].replace(
                "%", "%%"
            )  # argparse formats help with %: "33%" is text
        if metadata != dict(field.metadata):
            field = copy.copy(field)
            field.metadata = metadata
        HfArgumentParser._parse_dataclass_field(parser, field)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = translate_flags(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> Any:
        # argparse's "argument --x/--y: invalid choice: 'v' (choose from 'a', 'b')" in st-synth's own words
        bad = re.match(r"argument --([\w.-]+)\S*: invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if bad:
            name, value, choices = bad.groups()
            choices = ", ".join(choice.strip().strip("'") for choice in choices.split(","))
            message = f"{name} {value!r} is unknown; choose one of: {choices}."
        if self._raise_errors:
            raise SettingsError(message)
        return super().error(message)

    # -- settings from a mapping ------------------------------------------------------------------------
    def field_names(self) -> list[str]:
        return [f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init]

    def _action(self, name: str) -> Any:
        return next((a for a in self._actions if a.dest == name and a.option_strings), None)

    def settings_to_args(self, settings: dict[str, Any]) -> list[str]:
        """A mapping of settings as this parser's flags, so each value is converted to its field's type
        exactly as a flag typed by hand is. ``None`` leaves a field at its default."""
        flags: list[str] = []
        for key, value in settings.items():
            if value is None:
                continue
            action = self._action(RENAMED.get(key, key)) or self._action(_checkpointing_name(key))
            if isinstance(value, list) and action is not None and action.nargs in ("+", "*"):
                if value:  # an empty list is such a field's default: argparse takes no flag without values
                    flags += [f"--{key}", *map(str, value)]
            elif isinstance(value, list | dict):
                flags += [f"--{key}", json.dumps(value)]
            elif isinstance(value, bool):
                flags += [f"--{key}", str(value).lower()]
            else:
                flags += [f"--{key}", str(value)]
        return flags

    def parse_settings(self, settings: dict[str, Any], section: str = "settings") -> tuple[Any, ...]:
        """The dataclasses for a mapping of settings (a YAML section): unknown keys are refused with the
        valid ones, and every value goes through the same conversion and checks as its flag."""
        valid = sorted(self.field_names())
        accepted = {*valid, *RENAMED, *REPLACED_SWITCHES}
        unknown = sorted(
            key for key in settings if key not in accepted and _checkpointing_name(key) not in valid
        )
        if unknown:
            raise SettingsError(
                f"Unknown key(s) {unknown} in section {section!r}; valid keys: {', '.join(valid)}."
            )
        self._raise_errors = True
        try:
            parsed = self.parse_args_into_dataclasses(args=self.settings_to_args(settings))
            return tuple(_with_nulls(obj, settings) for obj in parsed)
        except SettingsError as error:
            raise SettingsError(f"Section {section!r}: {error}") from None
        finally:
            self._raise_errors = False

    def namespace_to_dataclasses(self, namespace: Any) -> tuple[Any, ...]:
        """The dataclasses of this parser from a namespace that a parent parser filled."""
        values = vars(namespace)
        objects = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            objects.append(dtype(**{k: v for k, v in values.items() if k in names}))
        return tuple(objects)


def _with_nulls(obj: Any, settings: dict[str, Any]) -> Any:
    """``obj`` with the fields that ``settings`` sets to null (YAML ``null``) set to None, where the field
    takes None: a flag cannot say None, so the parse left them at their defaults."""
    import typing

    def takes_none(name: str) -> bool:
        # The declared annotation (the parser rewrites field.type to the flag's type, without None).
        for cls in type(obj).__mro__:
            if name in getattr(cls, "__annotations__", {}):
                hint = cls.__annotations__[name]
                if isinstance(hint, str):
                    return "None" in hint
                return hint is None or type(None) in typing.get_args(hint)
        return False

    nulls = {
        f.name: None
        for f in dataclasses.fields(obj)
        if f.init and f.name in settings and settings[f.name] is None
        and getattr(obj, f.name) is not None and takes_none(f.name)
    }  # fmt: skip
    return dataclasses.replace(obj, **nulls) if nulls else obj


def yaml_problem(error: Exception) -> str:
    """A YAML (or encoding) error in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def yaml_settings(path: str | Path, what: str = "The config file", example: str = "recipes/configs/smollm2-cpu.yaml",
                  holds: str = "of settings") -> dict[str, Any]:  # fmt: skip
    """The mapping a YAML config file holds; a missing, unreadable or non-mapping file is a SettingsError
    naming ``what`` it is, with an ``example`` of a good one."""
    import yaml

    if not Path(path).is_file():
        raise SettingsError(f"{what} {path} does not exist; e.g. {example}.")
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SettingsError(f"{what} {path} is not readable YAML: {yaml_problem(error)}") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path} must hold a mapping {holds}, got {type(settings).__name__}.")
    return settings


def with_yaml(parser: SettingsParser, argv: list[str]) -> list[str]:
    """``--config CONFIG.yaml [flags]`` (or ``CONFIG.yaml [flags]``): the file's settings as flags, the command
    line's other flags after them (they win)."""
    argv = list(argv)
    given = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if len(given) > 1 or (given and argv and argv[0].endswith((".yaml", ".yml"))):
        raise SettingsError("Give the config file once: --config FILE.yaml (or FILE.yaml first).")
    if given:
        at = given[0]
        if argv[at] == "--config":
            if at + 1 >= len(argv):
                raise SettingsError("--config needs a file, e.g. --config recipes/configs/smollm2-cpu.yaml.")
            path, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
        else:
            path, rest = argv[at].split("=", 1)[1], argv[:at] + argv[at + 1 :]
        return parser.settings_to_args(yaml_settings(path)) + rest
    if argv and argv[0].endswith((".yaml", ".yml")):
        return parser.settings_to_args(yaml_settings(argv[0])) + argv[1:]
    return argv
