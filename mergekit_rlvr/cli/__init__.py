"""`mergekit-rlvr`: one click command with lazily imported subcommands.

Each subcommand lives in its own module; starting the CLI imports none of them
(and no torch) until one is invoked.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

#: name -> ("module:attribute" of a click command, one-line help)
COMMANDS = {
    "fisher": ("mergekit_rlvr.cli.fisher:fisher", "Diagonal empirical Fisher of a model (for sar)."),
    "analyze": ("mergekit_rlvr.cli.analyze:analyze", "Task-vector measurements of the papers, one pass."),
    "toy-family": ("mergekit_rlvr.cli.toy:toy_family", "Train the toy base/sft/rl family on this CPU."),
    "serve": ("mergekit_rlvr.cli.serve:serve", "Serve a recipe with vLLM, coefficients swappable live."),
    "search": ("mergekit_rlvr.cli.search:search", "Search merge coefficients on a hot-swapped engine."),
    "select-queries": ("mergekit_rlvr.cli.select_queries:select_queries", "Difficulty-aware query selection (DoTS)."),
    "eval": ("mergekit_rlvr.cli.eval:eval_command", "Score merges with lm-evaluation-harness on one engine."),
    "demo": ("mergekit_rlvr.cli.demo:demo", "The whole pipeline on the toy family."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise click.ClickException(f"subcommand {name!r} is not available: {error}")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-rlvr")
def cli():
    """Merge post-trained checkpoints (dots, sar, reasoning_interp) and search merge
    coefficients at test time on a hot-swapped vLLM engine."""


def main(argv=None):
    """Console entry point: our input errors end in one line and exit code 1."""
    from mergekit_rlvr.errors import UserError

    try:
        cli.main(args=argv, prog_name="mergekit-rlvr", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(1)
    except UserError as error:
        if os.environ.get("MERGEKIT_RLVR_DEBUG"):
            raise
        sys.stderr.write(f"error: {error}\n")
        sys.exit(1)
