"""The command line of train.py and eval.py: --name=value flags into a flat config dataclass.

    cfg, given = parse_flags(sys.argv[1:], Config, PRESETS)   # --preset=NAME first, then every other flag

Unknown names and bad values exit with one line (naming the closest flags), so a typo never reaches a model load.
"""
import dataclasses
import difflib
import math
import sys


def parse_flags(argv, config_cls, presets):
    """--name=value flags -> (config, names given). --preset is applied first; unknown names and bad values exit
    with one line."""
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
