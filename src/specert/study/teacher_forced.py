"""The study's teacher-forced measurements on an in-process target: its greedy text, batched across prompts, with
every step's statistics and certificates; and each drafter scored along that text (KL(p || q), the drafter-side
certificate and, per rule, whether each step is certified and accepted)."""

from __future__ import annotations

import pyarrow as pa
import torch

from specert.decoding.forward import batched_greedy
from specert.decoding.models import LoadedModel, encode_prompt
from specert.drafters import Drafter, NGramDrafter
from specert.study.prompts import Prompt
from specert.theory.acceptance import accepts, tokens_accepted
from specert.theory.certificates import certificates, drafter_certificate
from specert.theory.divergence import kl


def prompt_batches(loaded: LoadedModel, prompts: list[Prompt], cfg):
    """Token ids per prompt (too-long prompts dropped) and batches of prompt indices of similar length."""
    encoded, dropped = {}, 0
    for i, p in enumerate(prompts):
        ids = encode_prompt(loaded, p.text) if len(p.text) < 20 * cfg.max_prompt_tokens else None
        if ids is None or len(ids) > cfg.max_prompt_tokens or len(ids) + cfg.steps > loaded.context_length:
            dropped += 1
            continue
        encoded[i] = ids
    order = sorted(encoded, key=lambda i: (len(encoded[i]), i))
    batches = [order[j : j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]
    return encoded, batches, dropped


def target_part(loaded, prompts, encoded, batch, cfg) -> pa.Table:
    """Phase 1 of :func:`~specert.study.evaluation.run_eval` for one batch of prompts: greedy decoding with
    per-step statistics and certificates."""
    cols: dict[str, list] = {k: [] for k in ("prompt_index", "prompt_id", "category", "step", "token", "p_top1",
                                             "top10_mass", "margin", "entropy")}
    certs: dict[str, list] = {r: [] for r in cfg.rules}
    for step, logits, tokens, alive in batched_greedy(loaded.model, [encoded[i] for i in batch], cfg.steps,
                                                      loaded.eos_token_ids):
        live = alive.nonzero()[:, 0]
        rows = logits[live]  # [b, V]
        logp = torch.log_softmax(rows.double(), -1)
        top = torch.topk(logp, 10, -1).values.exp()  # [b, 10]
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        for r, c in certificates(rows, cfg.rules).items():
            certs[r] += c.tolist()
        for j, b in enumerate(live.tolist()):
            i = batch[b]
            cols["prompt_index"].append(i)
            cols["prompt_id"].append(prompts[i].id)
            cols["category"].append(prompts[i].category)
            cols["step"].append(step)
            cols["token"].append(int(tokens[b]))
            cols["p_top1"].append(float(top[j, 0]))
            cols["top10_mass"].append(float(top[j].sum()))
            cols["margin"].append(float(top[j, 0] - top[j, 1]))
            cols["entropy"].append(float(entropy[j]))
    table = pa.table(cols)
    for r, values in certs.items():
        table = table.append_column(f"cert:{r}", pa.array(values, pa.float64()))
    return table


@torch.inference_mode()
def drafter_part(loaded: LoadedModel, drafter_spec: str, drafter: Drafter, encoded, greedy, batch, cfg) -> pa.Table:
    """Phase 2 of :func:`~specert.study.evaluation.run_eval` for one drafter and one batch: teacher-forced q along
    the target's greedy text."""
    cols: dict[str, list] = {"prompt_index": [], "step": [], "draft_token": [], "kl": [], "drafter_certificate": []}
    per_rule: dict[str, list] = {}
    for i in batch:
        gen = greedy[i]
        if not gen:
            continue
        seq = encoded[i] + gen
        n = len(encoded[i])
        full = torch.tensor([seq[:-1]])
        layers = drafter.feature_layers
        out = loaded.model(full, output_hidden_states=bool(layers))
        p = out.logits[0, n - 1 :].double()  # [T, V]: p at every generated step
        if isinstance(drafter, NGramDrafter):
            draft_tokens = torch.tensor([(drafter.continuations(torch.tensor(seq[: n + t]))[1] or [(-1, -1)])[0][0]
                                         for t in range(len(gen))])
            has = draft_tokens >= 0
            divergence = torch.full((len(gen),), float("nan"), dtype=torch.float64)
            d_q = divergence.clone()
            certs = certificates(p, cfg.rules)
            for r in cfg.rules:
                ok = torch.zeros(len(gen), dtype=torch.bool)
                if has.any():
                    ok[has] = tokens_accepted(p[has], draft_tokens[has], r)
                per_rule.setdefault(f"accepted:{r}", []).extend(ok.tolist())
                per_rule.setdefault(f"certified:{r}", []).extend([False] * len(gen))
                per_rule.setdefault(f"cert:{r}", []).extend(certs[r].tolist())
        else:
            if layers:  # a head over the target's states
                states = torch.cat([out.hidden_states[j][0] for j in layers], -1)  # [T, nl * H]
                q = drafter.score(seq[:-1], states)[n - 1 :].double()
            else:
                q = drafter.score(seq[:-1], n - 1)[n - 1 :].double()  # [T, V]
            draft_tokens = q.argmax(-1)
            divergence, d_q = kl(p, q), drafter_certificate(q, 1)
            certs = certificates(p, cfg.rules)
            for r in cfg.rules:
                per_rule.setdefault(f"accepted:{r}", []).extend(accepts(p, q, r).tolist())
                per_rule.setdefault(f"certified:{r}", []).extend((divergence < certs[r]).tolist())
                per_rule.setdefault(f"cert:{r}", []).extend(certs[r].tolist())
        cols["prompt_index"] += [i] * len(gen)
        cols["step"] += list(range(len(gen)))
        cols["draft_token"] += draft_tokens.tolist()
        cols["kl"] += divergence.tolist()
        cols["drafter_certificate"] += d_q.tolist()
    table = pa.table(cols)
    for name, values in per_rule.items():
        table = table.append_column(name, pa.array(values))
    return table.append_column("drafter", pa.array([drafter_spec] * len(table), pa.string()))
