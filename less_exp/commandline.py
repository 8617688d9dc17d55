"""The command lines' front: signals, and the checks of a command line that need no torch.

``less-train`` and ``less-eval`` start here: the overrides are composed once and checked (Hydra's own
errors, unknown ``+`` keys, the schema of :mod:`less_exp.schema`) in about a second, and only then is
the job's module, with torch and transformers, imported.
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys

from omegaconf import DictConfig, OmegaConf

from less_exp import schema
from less_exp.errors import ConfigError
from less_exp.paths import unwritable_output

JOB_CONFIGS = ("train", "eval")  # the configs :mod:`less_exp.schema` describes

SWEEP_FAILURES: list[int] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the job is so that it unwinds (its ``results.json`` says failed,
    trackers close) and ends in one line with exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once
    raise Interrupted(signum)


def signal_name(err: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(err, "signum", signal.SIGINT)).name


def interrupted(prog: str, err: KeyboardInterrupt, hint: str = "rerun the same command to resume") -> None:
    print(f"{prog}: interrupted ({signal_name(err)}); {hint}", file=sys.stderr)
    sys.exit(128 + int(getattr(err, "signum", signal.SIGINT)))


def compose_error(config_name: str, argv: list[str]) -> str | None:
    """What is wrong with the command line's overrides (an unknown group option or key, bad syntax,
    a missing value), found by composing the config once before Hydra runs; None when it composes.
    Sweeps (``-m``) and Hydra's own options are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from less_exp.paths import conf_dir

    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return None
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=list(argv), return_hydra_config=True)
            OmegaConf.to_container(cfg.get("paths", {}), resolve=False)
            problem = unknown_added_key(config_name, list(argv))
            if problem or config_name not in JOB_CONFIGS:
                return problem
            schema.check(cfg)
            return None
    except ConfigError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        options = [line for line in lines[1:] if not line.startswith(("Config search path", "provider="))]
        head = lines[0] if lines else type(err).__name__
        if "Available options" in " ".join(options):
            index = next(i for i, line in enumerate(options) if line.startswith("Available options"))
            head += f" ({options[index].rstrip(':').lower()}: {', '.join(options[index + 1:])})"
        elif len(lines) > 1 and not lines[1].startswith("full_key"):
            head += f" ({lines[1]})"
        return head


# mappings whose entries the user names: a `+` key under them adds an entry, it is not a typo
OPEN_MAPPINGS = ("model.config", "study.methods", "study.evaluations")
_ABSENT = object()


def unknown_added_key(config_name: str, argv: list[str]) -> str | None:
    """The first ``+key=value`` of ``argv`` that adds a key unknown to the config composed without the
    ``+`` keys, as one line naming the closest known key; None when every ``+`` key is legitimate.

    The rule: walk up from the key to its deepest ancestor that the config has; when that ancestor is a
    mapping whose keys are known (any mapping, except Hydra's own and the user-named entries of
    :data:`OPEN_MAPPINGS` and their insides), the key is a typo or unknown and is refused. ``++key``
    (a deliberate force-add), ``+group=option`` and ``+group@package=option`` (config groups) pass.
    Call inside Hydra's ``initialize_config_dir``.
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    added = [o for o in OverridesParser.create().parse_overrides(argv)
             if o.is_add() and o.package is None and not o.key_or_group.startswith("hydra")
             and "/" not in o.key_or_group and not loader.get_group_options(o.key_or_group)]
    if not added:
        return None
    lines = {o.input_line for o in added}
    cfg = compose(config_name, overrides=[a for a in argv if a not in lines])
    for override in added:
        key = override.key_or_group
        parts = key.split(".")
        depth = len(parts) - 1
        while depth and OmegaConf.select(cfg, ".".join(parts[:depth]), default=_ABSENT,
                                         throw_on_resolution_failure=False) is _ABSENT:
            depth -= 1
        parent = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
        if not isinstance(node, DictConfig) or any(f"{key}.".startswith(f"{m}.") for m in OPEN_MAPPINGS):
            continue
        missing, known = parts[depth], [str(k) for k in node.keys()]
        close = difflib.get_close_matches(missing, known, n=1)
        where = f"{parent} has no key" if parent else "the config has no top-level key"
        hint = f"did you mean {'.'.join([*parts[:depth], close[0]])}?" if close else f"known: {', '.join(known[:12])}"
        return f"{override.input_line}: {where} {missing} ({hint}); set an existing key without '+'"
    return None


def cli(prog: str, config_name: str, main) -> None:
    """A console script: a bad override, a key or value the schema refuses (:mod:`less_exp.schema`) or
    an unwritable output folder is one line (exit code 2), found before torch is imported; then
    ``main`` (the Hydra entry point, or ``"module:function"`` naming it, imported only now) runs.
    SIGINT and SIGTERM end it with one line and exit code 130 / 143 (:class:`Interrupted`)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        problem = compose_error(config_name, sys.argv[1:]) or unwritable_output(sys.argv[1:])
        if problem:
            print(f"{prog}: error: {problem}", file=sys.stderr)
            sys.exit(2)
        if isinstance(main, str):
            module, name = main.split(":")
            main = getattr(importlib.import_module(module), name)
        main()
    except KeyboardInterrupt as err:
        interrupted(prog, err)
    if SWEEP_FAILURES:
        sys.exit(SWEEP_FAILURES[0])


def train() -> None:
    """The ``less-train`` console script."""
    cli("less-train", "train", "less_exp.train:main")


def evaluate() -> None:
    """The ``less-eval`` console script."""
    cli("less-eval", "eval", "less_exp.eval:main")
