"""revlit's LightningCLI: ``fit`` / ``validate`` / ``test`` / ``predict`` for every stage.

Subclass mode for model and data (YAML picks them with ``class_path``/``init_args``),
``trainer.inference_mode: false`` by default (the defense and the attacks need input gradients),
a TensorBoardLogger under ``logs/``, the resolved config saved per run, seed 0 by default.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

#: Lightning's messages that tell a revlit user nothing they can act on: adverts, the hardware
#: census (the progress bar names the device) and the seed line (the records hold the seed)
NOISE = ("💡 Tip", "GPU available", "TPU available", "HPU available", "Seed set to")
#: framework deprecation and advice lines about Lightning's own internals or settings revlit chose
#: on purpose (e.g. no dataloader workers: the data are in memory)
IGNORED_WARNINGS = (
    r".*treespec.*LeafSpec.*deprecated.*",
    r".*does not have many workers.*",
    r".*is deprecated.*(torch|lightning).*",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(NOISE)


def quiet() -> None:
    """Keep Lightning's output to what a user can act on (idempotent)."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for target in [lg, *lg.handlers]:
            if not any(isinstance(f, _DropNoise) for f in target.filters):
                target.addFilter(_DropNoise())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class RevlitCLI(LightningCLI):
    """LightningCLI with revlit's defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str,
            default="default",
            help="Name of the TensorBoard run folder under logs/ (logs/<run_name>/version_N).",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = cfg.trainer.get("logger")
        run_name = cfg.get("run_name", "default")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if init.get("name") in (None, "lightning_logs"):
                init["name"] = run_name


def _trainer_defaults() -> dict:
    from revlit.callbacks.throughput import ImagesPerSecond

    return {
        "callbacks": [ImagesPerSecond()],  # img/s in every progress bar
        "inference_mode": False,
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": os.environ.get("REVLIT_LOG_DIR", "logs")},
        },
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cli.py`` and of the ``revlit`` console script.

    Errors that come from bad input (unknown norm, missing data, unsafe checkpoint, ...) are printed
    as one line and the process exits with status 2, leaving whatever was already written intact.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("revlit").setLevel(logging.INFO)
    quiet()
    argv = sys.argv
    if args is not None:  # called from Python: the args ARE the command line
        sys.argv = argv[:1]
    try:
        RevlitCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults=_trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            # usage errors raise (one line below) instead of printing the whole usage
            parser_kwargs={"exit_on_error": False}
            | ({"parser_mode": "omegaconf"} if _has_omegaconf() else {}),
            args=args,
        )
    except (argparse.ArgumentError, ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("REVLIT_DEBUG"):
            raise
        # jsonargparse wraps an init-arg error in "Does not validate against any of the Union
        # subtypes"; the user needs the innermost message (e.g. "adversarial must be one of ...").
        root: BaseException = e
        while root.__cause__ is not None:
            root = root.__cause__
        text = str(root).strip() or str(e).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        key = _failing_key(e)
        if key and key not in msg:
            msg = f"{key}: {msg}"
        print(f"revlit: error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = argv


def _failing_key(e: BaseException) -> str | None:
    """The option a jsonargparse error is about (e.g. ``model.init_args.steps``), if it says."""
    chain = []
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    text = "\n".join(chain)
    key = max(re.findall(r"""[Kk]ey ['"]([\w.]+)['"]""", text), key=len, default=None)
    nested = re.search(r"NestedArg\(key='([\w.]+)'", text)
    return f"{key}.init_args.{nested.group(1)}" if key and nested else key


def _has_omegaconf() -> bool:
    return False


if __name__ == "__main__":
    main()
