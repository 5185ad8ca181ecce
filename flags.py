"""The command line of train.py and eval.py: --name=value flags into a flat config dataclass.

    cfg, given = parse_flags(sys.argv[1:], Config, PRESETS)   # --preset=NAME first, then every other flag

A field's type says what its flag takes: bool (true/false/1/0), int, float (finite), str, `float | None` ("none" is
None) or `Literal["a", "b"]` (one of those values; the one place they are listed: the check and --help read them).
Unknown names and bad values exit with one line (naming the closest flags or the allowed values), so a typo never
reaches a model load. --help (or -h) prints every flag with its default, its allowed values and its field's `# comment`
in the Config source (the trailing comment, with the comment lines under it aligned with it: the dataclass is the one
place flags are documented), then the presets, and exits 0.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import sys
import textwrap
import tokenize
import typing


def parse_flags(argv, config_cls, presets):
    """--name=value flags -> (config, names given). --preset is applied first; unknown names and bad values exit
    with one line; --help prints the flags and presets and exits 0."""
    if "--help" in argv or "-h" in argv:
        print(usage(config_cls, presets))
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    args = {}
    for a in argv:
        name, eq, value = a.removeprefix("--").partition("=")
        if not a.startswith("--") or name not in fields:
            prefix = [f for f in fields if name.startswith(f) or f.startswith(name)]  # --lr_rate: --lr; --temp
            close = list(dict.fromkeys(prefix + difflib.get_close_matches(name, fields, n=3)))[:3]
            sys.exit(f"error: unknown flag {a!r}" + (f"; did you mean {', '.join('--' + c for c in close)}?" if close
                     else f"; flags are --name=value with name in: {', '.join(fields)}"))
        args[name] = value if eq else "true"
    preset = args.get("preset", config_cls.preset)
    if preset not in presets:
        sys.exit(f"error: unknown --preset={preset}; choose one of {', '.join(presets)}")
    cfg = config_cls(**{**presets[preset], "preset": preset})
    types = typing.get_type_hints(config_cls)
    for name, value in args.items():
        setattr(cfg, name, parse_value(name, value, types[name]))
    return cfg, set(args)


def parse_value(name, value, kind):
    """The string of --name=value -> a value of the field's type `kind`; exits with one line if it is not one."""
    if choices := literal_values(kind):
        if value not in choices:
            sys.exit(f"error: --{name}={value} is not one of {', '.join(choices)}")
        return value
    if type(None) in typing.get_args(kind):  # X | None
        if value.lower() == "none":
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    try:
        x = {"true": True, "1": True, "false": False, "0": False}[value.lower()] if kind is bool else kind(value)
    except (ValueError, KeyError):
        sys.exit(f"error: --{name}={value} is not a valid {kind.__name__}")
    if kind is float and not math.isfinite(x):  # float("nan") parses, then poisons the run
        sys.exit(f"error: --{name}={value} is not a finite number")
    return x


def literal_values(kind):
    """The allowed values of a `Literal[...]` field type (as strings), () for any other type."""
    return tuple(map(str, typing.get_args(kind))) if typing.get_origin(kind) is typing.Literal else ()


def field_comments(config_cls):
    """{field name: its # comment in the class source ("" if none)}: the trailing comment of its line, and the
    comment-only lines right under it that start in the same column (a comment that runs on), joined by spaces."""
    src = textwrap.dedent(inspect.getsource(config_cls))
    lines = src.splitlines()
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())  # line -> (column, text)
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    out = {}
    for n in (n for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)):
        column, text = comments.get(n.end_lineno, (None, ""))
        row = n.end_lineno + 1
        while row in comments and comments[row][0] == column and lines[row - 1].lstrip().startswith("#"):
            text, row = f"{text} {comments[row][1]}", row + 1
        out[n.target.id] = text
    return out


def usage(config_cls, presets):
    """The --help text: the script docstring's first two paragraphs, each flag as --name=default with its
    comment, then each preset's fields."""
    module = sys.modules[config_cls.__module__]
    show = lambda v: str(v).lower() if isinstance(v, bool) or v is None else str(v)
    lines = [f"usage: python {os.path.basename(module.__file__)} [--preset=NAME] [--name=value ...]", "",
             "\n\n".join((module.__doc__ or "").strip().split("\n\n")[:2]), "", "flags (--name=value; shown with the default):"]
    comments, types = field_comments(config_cls), typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = f"  --{f.name}={show(f.default)}"
        choices = literal_values(types[f.name])
        text = (f"{{{', '.join(choices)}}} " if choices else "") + comments[f.name]  # {ddp, zero2, zero3} ...
        text = textwrap.fill(text, width=120, initial_indent=" " * 38, subsequent_indent=" " * 38)
        lines.append(flag + text[len(flag):] if len(flag) < 38 else f"{flag}\n{text}")
    lines += ["", "presets (--preset=NAME sets these fields first; other flags then override them):"]
    for name, fields in presets.items():
        lines.append(textwrap.fill(" ".join(f"{k}={show(v)}" for k, v in fields.items()), width=118,
                                   initial_indent=f"  {name:<9}", subsequent_indent=" " * 11))
    return "\n".join(line.rstrip() for line in lines)
