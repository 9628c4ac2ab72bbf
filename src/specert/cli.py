"""The ``specert`` command line: parse arguments, call one library function, print."""

from __future__ import annotations

import json
import math
import sys

import click
import torch

from specert.rules import STANDARD_RULES, rule


class SpecertError(click.ClickException):
    """A one-line error and a non-zero exit, never a traceback."""


def _fail_cleanly(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise SpecertError(str(e)) from None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specert")
def main():
    """specert: when is a draft accepted? Certificates, speculative decoding and evaluation."""


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "-"
    return f"{x:.4g}"


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--draft", "draft_file", type=click.Path(dir_okay=False), help="Drafter logits, same shape.")
@click.option("--rule", "rules", multiple=True, help="Rule spec (repeatable); default: the standard set.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_fail_cleanly
def certify(file, draft_file, rules, as_json):
    """Certificates, margins and margin bounds of target logits FILE (.npy, .pt, .safetensors) per rule.

    With --draft, also KL(p || q), the drafter-side certificate D_q(1) and whether each rule accepts.
    """
    from specert.files import load_logits
    from specert.report_certify import certify_records

    parsed = [rule(r) for r in (rules or STANDARD_RULES)]
    target = load_logits(file)
    draft = load_logits(draft_file) if draft_file else None
    if draft is not None and draft.shape != target.shape:
        raise ValueError(f"--draft has shape {list(draft.shape)} but the target has {list(target.shape)}")
    records = certify_records(target, parsed, draft)
    if as_json:
        click.echo(json.dumps(records, indent=1))
        return
    cols = ["step", "rule", "certificate", "margin", "lower", "upper"]
    if draft is not None:
        cols += ["kl", "D_q(1)", "certified", "accepted"]
    rows = [[r["step"], r["rule"]] + [_fmt(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols[2:]]
            for r in records]
    widths = [max(len(c), *(len(str(row[i])) for row in rows)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


@main.command()
@click.option("--batch", default=512, show_default=True, help="Rows of random logits.")
@click.option("--vocab", default=151936, show_default=True, help="Vocabulary size (Qwen's by default).")
@click.option("--repeat", default=3, show_default=True, help="Timed calls per entry (median).")
@_fail_cleanly
def bench(batch, vocab, repeat):
    """Time every standard rule's certificate against torch.logsumexp on the same [batch, vocab] logits."""
    from specert.bench import run_bench

    if batch < 1 or vocab < 2 or repeat < 1:
        raise ValueError("--batch and --repeat must be >= 1 and --vocab >= 2")
    click.echo(f"[{batch}, {vocab}] float32 random logits, {torch.get_num_threads()} threads, median of {repeat}")
    click.echo(f"{'what':28s} {'ms':>9s} {'x logsumexp':>12s}")
    for name, seconds, ratio in run_bench(batch, vocab, repeat):
        click.echo(f"{name:28s} {seconds * 1000:9.1f} {ratio:12.2f}")


if __name__ == "__main__":
    sys.exit(main())
