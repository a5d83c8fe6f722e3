"""The ``mergelab`` command. Thin: parse arguments, call the public API, print.

Every user error surfaces as a :class:`~mergelab.errors.MergelabError`, printed as one
``error: ...`` line with exit code 2 (click's own usage errors also exit 2).
"""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import MergelabError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MergelabError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergelab")
def main() -> None:
    """Merge neural networks: merge, align, compute statistics, repair, reproduce."""


# ---------------------------------------------------------------- merge / inspect


# ---------------------------------------------------------------- align


# ---------------------------------------------------------------- stats


# ---------------------------------------------------------------- data / reproduce


if __name__ == "__main__":  # pragma: no cover
    main()
