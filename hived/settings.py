"""A command's options from three places: its flags, ``HIVED_*`` variables, and a TOML file.

Precedence, highest first: a flag, then the variable ``HIVED_<OPTION>`` (``HIVED_PORT``,
``HIVED_INNER_STEPS``), then the ``--config`` file, then the default (for training options: the
preset's). Click already ranks a command line above a variable above its ``default_map``, so the
file becomes the ``default_map`` and nothing here re-implements the ranking. What it adds is the
file's checks: every key must be an option of the command, and every value of its type as TOML
wrote it, so ``lr = "3e-3"`` is an error that names ``lr`` instead of a string that click would
quietly convert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .config import ConfigError, of_type, read_toml

PREFIX = "HIVED_"
MODEL_TABLE = "model"  # a [model] table: overrides of the preset's shape, for commands that train


def from_environment(command: click.Command) -> click.Command:
    """Give every option of ``command`` that reads no variable yet its ``HIVED_<OPTION>`` one."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None and param.name not in ("config_file", "help"):
            param.envvar = PREFIX + param.name.upper()
            param.show_envvar = True
    return command


def config_option(*, model_table: bool):
    """``--config FILE``: a TOML file whose keys are the command's option names (``batch_size``
    or ``batch-size``), checked and handed to click as the command's defaults. With
    ``model_table``, a ``[model]`` table is kept in ``ctx.meta[MODEL_TABLE]``."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        ctx.meta[MODEL_TABLE] = {}
        if value is None:
            return None
        try:
            values = read_toml(value)
            model = values.pop(MODEL_TABLE, {}) if model_table else {}
            if not isinstance(model, dict):
                raise ConfigError(f"{value}: [model] must be a table")
            ctx.meta[MODEL_TABLE] = model
            ctx.default_map = {**(ctx.default_map or {}), **checked(ctx.command, values, value)}
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value

    return click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), is_eager=True,
                        expose_value=True, callback=load,
                        help="a TOML file of these options (names as the flags'); variables override it, "
                             "flags override both")


def checked(command: click.Command, values: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """``values`` keyed by parameter name, after checking each against its option."""
    params = {p.name: p for p in command.params if p.name not in ("config_file", "help")}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        param = params.get(name)
        if param is None:
            raise ConfigError(f"{source}: unknown option(s) {key}; valid ones are: {', '.join(sorted(params))}")
        if param.multiple and not isinstance(value, list):
            value = [value]  # data = "corpus/" as well as data = ["a.txt", "b.txt"]
        for item in value if param.multiple else [value]:
            _check(param, key, item, source)
        out[name] = value
    return out


def _kind(param: click.Parameter) -> str:
    t = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return "bool"
    if isinstance(t, (click.types.IntParamType, click.IntRange)):
        return "int"
    if isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        return "float"
    return "str"  # strings, choices, paths, files


def _example(param: click.Parameter) -> str:
    return {"bool": "true", "int": "8", "float": "0.5", "str": '"..."'}[_kind(param)]


def _check(param: click.Parameter, key: str, value: Any, source: str | Path) -> None:
    kind = _kind(param)
    if not of_type(kind, value):
        word = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}[kind]
        raise ConfigError(f"{source}: {key} must be {word} (as in {key} = {_example(param)}), not {value!r}")
    if isinstance(param.type, click.Choice) and value not in param.type.choices:
        raise ConfigError(f"{source}: {key} = {value!r} is not one of {', '.join(map(str, param.type.choices))}")
