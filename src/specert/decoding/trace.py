"""The per-position trace of a speculative decode, its Parquet file, and summary metrics in vLLM's conventions.

A row is one verified position (a point where drafted tokens waited for the target's verdict). ``certified`` is
KL(p || q) < the certificate of the active rule at that position; ``certified and not accepted`` must never
happen (THEORY.md section 2): the decoder counts it as a soundness violation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from specert.theory.certificates import certificate, drafter_certificate
from specert.theory.divergence import kl
from specert.theory.rules import Rule, Tree


@dataclass
class StepTrace:
    step: int  # index of the target forward in this generation
    position: int  # depth of the position along the accepted path (0 = right after the context)
    token_index: int  # index in the generated text of the token emitted at this position
    target_token: int  # the target's greedy token x0
    draft_tokens: list[int]  # the drafted candidates at this position (one in chain mode)
    accepted: bool  # a drafted candidate was accepted here
    emitted_token: int  # the token kept at this position (accepted draft or the target's correction)
    width: int  # number of candidates
    kl: float  # KL(p || q); NaN for drafters without a distribution
    certificate: float  # under the active rule (tree:width for tree rules)
    certificate_greedy: float  # under strict greedy
    p_top1: float
    margin: float  # p_(1) - p_(2)
    entropy: float  # nats
    drafter_certificate: float  # D_q(1); NaN without a distribution

    @property
    def certified(self) -> bool:
        return self.kl < self.certificate


def trace_positions(step: int, first_token: int, tree, logits: torch.Tensor, path: list[int], r: Rule):
    """Trace rows for the positions along the accepted path that had drafted children."""
    along = [-1] + path  # position j of the path; path[j] is the node accepted there, if any
    keep = [j for j, p in enumerate(along) if tree.children(p)]
    positions = [along[j] for j in keep]
    nexts = [path[j] if j < len(path) else None for j in keep]
    if not positions:
        return []
    rows = torch.tensor([p + 1 for p in positions])
    p_logits = logits[rows]  # [R, V]
    widths = [len(tree.children(p)) for p in positions]
    if isinstance(r, Tree):
        cert = torch.stack([certificate(p_logits[i], Tree(w)) for i, w in enumerate(widths)])
    else:
        cert = certificate(p_logits, r)
    greedy = certificate(p_logits, "greedy")
    logp = torch.log_softmax(p_logits.double(), -1)
    top2 = torch.topk(logp, 2, -1).values.exp()
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
    if tree.logits is not None and all(tree.expanded[p + 1] for p in positions):
        q_logits = tree.logits[rows]
        divergence, d_q = kl(p_logits, q_logits), drafter_certificate(q_logits, 1)
    else:
        divergence = d_q = torch.full((len(positions),), math.nan, dtype=torch.float64)
    out = []
    for i, pos in enumerate(positions):
        kids, nxt = tree.children(pos), nexts[i]
        x0 = int(p_logits[i].argmax())
        out.append(StepTrace(
            step=step, position=i, token_index=first_token + i, target_token=x0,
            draft_tokens=[tree.tokens[c] for c in kids], accepted=nxt is not None,
            emitted_token=tree.tokens[nxt] if nxt is not None else x0, width=widths[i],
            kl=float(divergence[i]), certificate=float(cert[i]), certificate_greedy=float(greedy[i]),
            p_top1=float(top2[i, 0]), margin=float(top2[i, 0] - top2[i, 1]), entropy=float(entropy[i]),
            drafter_certificate=float(d_q[i]),
        ))
    return out


@dataclass
class SpecDecodeMetrics:
    """Summary of one or more generations, in vLLM's conventions.

    - ``mean_acceptance_length`` = 1 + accepted / drafts (the bonus token included): tokens per target forward
      over the steps that drafted anything;
    - ``draft_acceptance_rate`` = accepted / drafted positions;
    - ``acceptance_rate_per_position[i]`` = steps that accepted at position i / steps that drafted there.
    - ``soundness_violations``: traced positions certified (KL < certificate) but rejected; must be 0.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_generated_tokens: int = 0
    num_target_tokens: int = 0  # tokens the target ran, every step (1 + tree nodes; 1 at a step that drafted nothing)
    num_verifying_tokens: int = 0  # ... at the steps that drafted (their forwards verified drafted tokens)
    seconds: float = 0.0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    certified_positions: int = 0
    traced_positions: int = 0
    soundness_violations: int = 0

    def observe(self, gen) -> None:
        for acc, drafted, verified in zip(gen.accepted, gen.drafted, gen.verified):
            if drafted == 0:
                continue
            self.num_drafts += 1
            self.num_verifying_tokens += verified
            self.num_draft_tokens += drafted
            self.num_accepted_tokens += acc
            while len(self.drafted_per_position) < drafted:
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            for i in range(drafted):
                self.drafted_per_position[i] += 1
                self.accepted_per_position[i] += int(i < acc)
        self.num_generated_tokens += len(gen.tokens)
        self.num_target_tokens += sum(gen.verified)
        self.seconds += gen.seconds
        for row in gen.trace:
            self.traced_positions += 1
            if row.certified:
                self.certified_positions += 1
                self.soundness_violations += int(not row.accepted)

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds else float("nan")

    @property
    def target_tokens_per_accepted(self) -> float:
        """Tokens the target ran, at every step (a plain forward's one token too), per drafted token it accepted."""
        return self.num_target_tokens / self.num_accepted_tokens if self.num_accepted_tokens else float("inf")

    @property
    def verifying_tokens_per_accepted(self) -> float:
        """Tokens the target ran in the forwards that verified drafted tokens (1 + the tree's nodes, at the steps
        that drafted) per drafted token it accepted: :attr:`target_tokens_per_accepted` without the plain forwards
        of steps that drafted nothing, which verify nothing."""
        return self.num_verifying_tokens / self.num_accepted_tokens if self.num_accepted_tokens else float("inf")

    @property
    def target_tokens_per_generated(self) -> float:
        """Tokens the target ran per generated token: its work per output token (1 for plain decoding)."""
        return self.num_target_tokens / self.num_generated_tokens if self.num_generated_tokens else float("nan")

    @property
    def drafted_per_accepted(self) -> float:
        """Drafted tokens (a tree's every node) the target verified per drafted token it accepted."""
        nodes = self.num_verifying_tokens - self.num_drafts
        return nodes / self.num_accepted_tokens if self.num_accepted_tokens else float("inf")

    def add(self, counts: dict) -> None:
        """Add another summary's counts (its ``dataclasses.asdict``): how summaries saved apart, one per prompt, are
        combined."""
        for name, value in counts.items():
            mine = getattr(self, name)
            if isinstance(mine, list):
                mine.extend([0] * (len(value) - len(mine)))
                for i, v in enumerate(value):
                    mine[i] += v
            else:
                setattr(self, name, mine + value)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_acceptance_length=self.mean_acceptance_length, draft_acceptance_rate=self.draft_acceptance_rate,
                 acceptance_rate_per_position=self.acceptance_rate_per_position,
                 tokens_per_second=self.tokens_per_second)
        return d


def write_trace(path, generations: list, metadata: dict) -> None:
    """Write the traced positions of ``generations`` (one ``prompt_id`` each, in order) to Parquet with the run's
    metadata (models, rule, drafter, k or tree) in the file's key-value metadata and as columns."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for prompt_id, gen in enumerate(generations):
        for row in gen.trace:
            records.append({"prompt_id": prompt_id, **asdict(row)})
    table = pa.Table.from_pylist(records) if records else pa.table({"prompt_id": pa.array([], pa.int64())})
    for key, value in metadata.items():
        table = table.append_column(key, pa.array([str(value)] * len(table), pa.string()))
    table = table.replace_schema_metadata({"specert": json.dumps({k: str(v) for k, v in metadata.items()})})
    pq.write_table(table, path)
