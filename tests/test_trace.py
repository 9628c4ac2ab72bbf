"""The trace of a speculative decode (specert.decoding.trace): its Parquet file, and the summary metrics in vLLM's
conventions (the mean acceptance length counts the bonus token)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from specert.decoding.loop import generate
from specert.decoding.trace import SpecDecodeMetrics, write_trace
from specert.drafters.model import ModelDrafter, layer_skip_view

PROMPT = [5, 17, 42, 17, 99, 3, 17, 42]


def test_trace_parquet(target, tmp_path):
    drafter = ModelDrafter(layer_skip_view(target.model, 3), "layerskip:3")
    gens = [generate(target, PROMPT, drafter, "typical:0.09,0.3", max_new_tokens=20, k=3, trace=True),
            generate(target, PROMPT[:4], drafter, "typical:0.09,0.3", max_new_tokens=20, k=3, trace=True)]
    path = tmp_path / "trace.parquet"
    write_trace(path, gens, {"target": target.name, "drafter": "layerskip:3", "rule": "typical:0.09,0.3",
                             "shape": "k=3"})
    table = pq.read_table(path)
    assert table.num_rows == sum(len(g.trace) for g in gens)
    assert set(table.column("prompt_id").to_pylist()) == {0, 1}
    for col in ["target_token", "draft_tokens", "accepted", "kl", "certificate", "certificate_greedy", "p_top1",
                "margin", "entropy", "drafter_certificate", "rule", "drafter"]:
        assert col in table.column_names
    kl = np.array(table.column("kl").to_pylist())
    assert np.isfinite(kl).all() and (kl >= 0).all()
    assert b"specert" in table.schema.metadata


def test_metrics_conventions():
    from specert.decoding.loop import Generation

    g = Generation([1], [1, 2, 3, 4, 5, 6], 1.0, accepted=[2, 0, 3], drafted=[3, 3, 3], verified=[4, 4, 4])
    m = SpecDecodeMetrics()
    m.observe(g)
    assert m.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert m.draft_acceptance_rate == pytest.approx(5 / 9)
    assert m.acceptance_rate_per_position == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert m.target_tokens_per_accepted == pytest.approx(12 / 5)
    assert m.verifying_tokens_per_accepted == pytest.approx(12 / 5)  # every step verified something
    m.observe(Generation([1], [7, 8], 1.0, accepted=[0, 1], drafted=[0, 1], verified=[1, 2]))  # a plain step
    assert m.target_tokens_per_accepted == pytest.approx(15 / 6)
    assert m.verifying_tokens_per_accepted == pytest.approx(14 / 6)  # its forward verified nothing
    assert m.drafted_per_accepted == pytest.approx(10 / 6)
    m.observe(Generation([1], [9], 1.0, accepted=[0], drafted=[2], verified=[5]))  # a tree of 4 nodes, 2 deep
    assert m.verifying_tokens_per_accepted == pytest.approx(19 / 6) and m.drafted_per_accepted == pytest.approx(14 / 6)
