"""What every training job shares: its command-line arguments, how they become a config, and its exit codes.

    main = training_job(__doc__, PRESETS, "vit_b16, ...", run)    # run(cfg, args) -> exit code

    (or, for a job with arguments of its own: add_job_arguments, job_config and exit_code one by one)

Exit codes: 0 done; 2 a bad config or input, found before any cluster resource was requested (ConfigError); 1 a
run that started and failed (TrainingFailed). Either way one `error:` line on stderr that names the cause. 130: Ctrl-C
or SIGTERM stopped the run (RunInterrupted): run.json says `interrupted`, and one `stopped:` line says how to resume.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from vitray.config.recipes import preset
from vitray.config.checks import validate
from vitray.config.schema import Config, ConfigError, apply_overrides, model_override


class TrainingFailed(RuntimeError):
    """A run that started and failed (a worker's error, a non-finite loss); the message names the run."""


class RunInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the driver; run.json says `interrupted`, the message says how to resume."""


def add_job_arguments(parser, table: dict, models: str, default: str = "smoke", init_from: bool = False) -> None:
    """The arguments every training job takes (see `job_config`); `init_from`: the fine-tuning jobs' --init-from."""
    parser.add_argument("--preset", default=default, help=f"recipe: {', '.join(table)} (default {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--model", help=f"= model.name: {models}")
    if init_from:
        parser.add_argument("--init-from", help="vitray checkpoint folder or official .npz (= transfer.init_from)")
    parser.add_argument("--run-name", help="name of the run folder under <storage>/runs (= storage.run_name)")
    parser.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # Three steps: the first pays one-off costs, the others give the step time.
    parser.add_argument("--rehearse", nargs="?", type=int, const=3, metavar="STEPS",
                        help="run the configured model for STEPS (default 3) steps on what is attached, save and"
                             " restore a checkpoint, and report time and memory beside the plan")


def job_config(args, table: dict, kind: str | None = None, models: str = "") -> Config:
    """The config `add_job_arguments`' arguments name: the preset, then --set, --model, --init-from and --run-name.
    Validated, and of the job's `kind` of model (`vitray.models.specs`: what it trains on) when one is given,
    unless it is only to be printed."""
    from vitray.models.registry import get_spec

    extra = ([f"storage.run_name={args.run_name}"] if args.run_name else []) + model_override(args.model)
    if getattr(args, "init_from", None):
        extra.append(f"transfer.init_from={args.init_from}")
    cfg = apply_overrides(preset(args.preset, table), args.overrides + extra)
    if getattr(args, "rehearse", None) is not None and not (cfg.data.train_uri or cfg.data.builtin):
        cfg = cfg.replace(data=dict(builtin=rehearsal_data(cfg)))  # a rehearsal with no data configured
    if not args.print_config:
        validate(cfg)
        if kind and get_spec(cfg.model.name).kind != kind:
            raise ConfigError(f"model.name: {cfg.model.name} is not a {kind} model ({models})")
    return cfg


def rehearsal_data(cfg: Config) -> str:
    """The built-in dataset a rehearsal runs on when no data is configured (cropped to the configured size)."""
    from vitray.models.registry import get_spec

    return "digit_canvases" if get_spec(cfg.model.name).kind == "detection" else "digits"


def exit_code(body: Callable[[], int]) -> int:
    """Run a job's body; its errors become one line on stderr and the exit code (module docstring)."""
    try:
        return body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT


def training_job(doc: str, table: dict, models: str, body: Callable, kind: str | None = None,
                 default: str = "smoke", init_from: bool = False) -> Callable[[list[str] | None], int]:
    """A training job's `main(argv)`: parse the shared arguments, build and check the config (or print it with
    --print-config), then `body(cfg, args)`, its errors turned into exit codes."""
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_job_arguments(parser, table, models, default, init_from)
        args = parser.parse_args(argv)

        def job() -> int:
            cfg = job_config(args, table, kind, models)
            if args.print_config:
                print(json.dumps(cfg.to_dict(), indent=1))
                return 0
            return body(cfg, args)

        return exit_code(job)

    return main
