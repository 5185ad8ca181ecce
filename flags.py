"""The command line of train.py and eval.py: --name=value flags into a flat config dataclass.

    cfg, given = parse_flags(sys.argv[1:], Config, PRESETS)   # --preset=NAME first, then every other flag

Unknown names and bad values exit with one line (naming the closest flags), so a typo never reaches a model load.
--help (or -h) prints every flag with its default and the trailing `# comment` of its field in the Config source (the
dataclass is the one place flags are documented), then the presets, and exits 0.
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
    for name, value in args.items():
        kind = type(getattr(cfg, name))
        try:
            setattr(cfg, name, {"true": True, "1": True, "false": False, "0": False}[value.lower()] if kind is bool
                    else kind(value))
        except (ValueError, KeyError):
            sys.exit(f"error: --{name}={value} is not a valid {kind.__name__}")
        if kind is float and not math.isfinite(getattr(cfg, name)):  # float("nan") parses, then poisons the run
            sys.exit(f"error: --{name}={value} is not a finite number")
    return cfg, set(args)


def field_comments(config_cls):
    """{field name: the trailing # comment of its line in the class source ("" if none)}."""
    src = textwrap.dedent(inspect.getsource(config_cls))
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    return {n.target.id: comments.get(n.end_lineno, "") for n in ast.parse(src).body[0].body
            if isinstance(n, ast.AnnAssign)}


def usage(config_cls, presets):
    """The --help text: the script docstring's first two paragraphs, each flag as --name=default with its
    comment, then each preset's fields."""
    module = sys.modules[config_cls.__module__]
    show = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
    lines = [f"usage: python {os.path.basename(module.__file__)} [--preset=NAME] [--name=value ...]", "",
             "\n\n".join((module.__doc__ or "").strip().split("\n\n")[:2]), "", "flags (--name=value; shown with the default):"]
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = f"  --{f.name}={show(f.default)}"
        lines.append(f"{flag:<38}{comments[f.name]}" if len(flag) < 38 else f"{flag}\n{'':38}{comments[f.name]}")
    lines += ["", "presets (--preset=NAME sets these fields first; other flags then override them):"]
    for name, fields in presets.items():
        lines.append(textwrap.fill(" ".join(f"{k}={show(v)}" for k, v in fields.items()), width=118,
                                   initial_indent=f"  {name:<9}", subsequent_indent=" " * 11))
    return "\n".join(line.rstrip() for line in lines)
