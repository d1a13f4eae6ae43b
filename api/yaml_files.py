"""Reading YAML (or JSON) files that the CLI takes, with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _DateCheckingLoader(yaml.SafeLoader):
    """A safe loader that reports an impossible unquoted date, such as 2026-02-30, at its line.

    PyYAML's safe loader turns unquoted dates into `date` objects and lets the ValueError of
    an impossible one escape as it is, without the file position.
    """

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"invalid date {node.value}: use an existing date, written YYYY-MM-DD",
                node.start_mark,
            ) from None


_DateCheckingLoader.add_constructor(
    "tag:yaml.org,2002:timestamp", _DateCheckingLoader.construct_yaml_timestamp
)


class YamlFileInvalid(ValueError):
    """A file that is not valid YAML or JSON. The message names the file and, if known, the line."""


def load_yaml_file(path: Path) -> Any:
    """Parse a YAML or JSON file; PyYAML reads JSON documents as YAML, so one loader reads both.

    Raises YamlFileInvalid naming the file, and the line and column where PyYAML reports them.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise YamlFileInvalid(f"invalid YAML or JSON in {path}: not UTF-8 text ({error})") from None
    try:
        return yaml.load(text, Loader=_DateCheckingLoader)  # noqa: S506 (a safe loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise YamlFileInvalid(f"invalid YAML or JSON in {where}: {problem}") from None
    except yaml.YAMLError as error:
        raise YamlFileInvalid(f"invalid YAML or JSON in {path}: {error}") from None
