"""The study on a served target (specert.study.served), against a real vLLM server of the embedded model.

The server runs in its own virtual environment, started as a user would (tests/vllm_server.py): float32, every
token's log-probability allowed (``--max-logprobs -1``). The in-process reference teacher-forces the embedded model
along the server's own greedy text, so both score the same steps.
"""

import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

import specert
from conftest import SPEC_BENCH
from specert.decoding.forward import forward, new_cache
from specert.served.client import ServedError, ServedModel
from specert.study.evaluation import EvalConfig, run_eval
from specert.theory.rules import STANDARD_RULES

pytestmark = pytest.mark.vllm

# vLLM's float32 forward and transformers' differ by rounding: top-20 log-probabilities agree within about 1e-4.
ENGINES = 2e-4


@pytest.fixture(scope="module")
def study(vllm_url, embedded, tmp_path_factory):
    """A served study at K = 20 on Spec-Bench prompts, with an in-process and an n-gram drafter."""
    out = tmp_path_factory.mktemp("served")
    cfg = EvalConfig(target=vllm_url, prompts=str(SPEC_BENCH), num_prompts=6, steps=24, batch_size=3,
                     drafters=("model:smollm2-135m", "ngram:3"), logprobs=20, concurrency=3)
    run_eval(cfg, out, progress=False)
    return out, _columns(out / "steps")


def _columns(path) -> dict[str, np.ndarray]:
    """A Parquet dataset's columns as numpy arrays."""
    return {name: np.asarray(values) for name, values in pq.read_table(path).to_pydict().items()}


def _rows(table: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in table.items()}


def _in_process(embedded, prompt_ids, tokens):
    """The embedded model's logits [T, V] at every step of a given greedy text."""
    logits = forward(embedded.model, new_cache(embedded.model), prompt_ids + tokens[:-1])
    return logits[len(prompt_ids) - 1 :].double()


def _prompt_ids(url, text):
    client = ServedModel(url)
    client.check()
    return client.tokenize([{"role": "user", "content": text}])


def test_exact_certificates_are_the_in_process_ones(study, vllm_url, embedded):
    """Every certificate the top 20 determine is the in-process certificate of the same step, within the two
    engines' rounding; every interval holds the in-process value."""
    out, steps = study
    from specert.study.prompts import load_prompts

    prompts = load_prompts(str(SPEC_BENCH), 6)
    exact_share = {}
    for index in np.unique(steps["prompt_index"]):
        mask = steps["prompt_index"] == index
        order = np.argsort(steps["step"][mask])
        group = {name: values[order] for name, values in _rows(steps, mask).items()}
        ids = _prompt_ids(vllm_url, prompts[index].text)
        tokens = group["token"].tolist()
        logits = _in_process(embedded, ids, tokens)
        assert logits.argmax(-1).tolist() == tokens  # the same greedy text (no near-tie here)
        full = specert.certificates(logits, STANDARD_RULES)
        for r in STANDARD_RULES:
            lower, upper = group[f"cert:{r}"], group[f"cert_upper:{r}"]
            exact, want = group[f"exact:{r}"].astype(bool), full[r].numpy()
            finite = np.isfinite(want)
            assert np.all(np.abs(lower - want)[exact & finite] <= ENGINES), r
            assert np.all(lower[finite] <= want[finite] + ENGINES) and np.all(want[finite] <= upper[finite] + ENGINES)
            exact_share.setdefault(r, []).extend(exact.tolist())
    for r, flags in exact_share.items():
        if r.startswith(("greedy", "topm", "tree")):
            assert all(flags), r  # rank rules read ranks 1..m+1 <= 20
    report = json.loads((out / "report" / "summary.json").read_text())
    titles = [t["title"] for t in report["tables"]]
    assert any(t.startswith("Certificates from the served top K") for t in titles)


def test_the_served_audit_is_sound(study):
    out, _ = study
    drafters = _columns(out / "drafters")
    for r in STANDARD_RULES:
        certified, decided = drafters[f"certified:{r}"].astype(bool), drafters[f"decided:{r}"].astype(bool)
        assert not (certified & decided & ~drafters[f"accepted:{r}"].astype(bool)).any(), r
    assert "Soundness audit: SOUND" in (out / "report" / "summary.md").read_text()
    model = _rows(drafters, drafters["drafter"] == "model:smollm2-135m")
    assert len(model["kl"]) > 0
    assert (model["kl"] <= model["kl_upper"]).all() and (model["kl"] < 1e-3).all()  # the same model in-process


def test_every_tokens_log_probability_gives_the_in_process_study(vllm_url, embedded, tmp_path):
    """With every token's log-probability (K = V) each certificate is exact and equals the in-process study's."""
    out = tmp_path / "all"
    cfg = EvalConfig(target=vllm_url, prompts=str(SPEC_BENCH), num_prompts=2, steps=6, logprobs=0,
                     rules=("greedy", "typical:0.09,0.3", "tree:4", "additive:0.1"))
    run_eval(cfg, out, progress=False)
    served = _columns(out / "steps")
    here = tmp_path / "here"
    run_eval(EvalConfig(prompts=str(SPEC_BENCH), num_prompts=2, steps=6, rules=cfg.rules, decode_prompts=0), here,
             progress=False)
    local = _columns(here / "steps")

    def in_step_order(table):
        order = np.lexsort((table["step"], table["prompt_index"]))
        return {name: values[order] for name, values in table.items()}

    served, local = in_step_order(served), in_step_order(local)
    assert served["prompt_index"].tolist() == local["prompt_index"].tolist()
    assert served["step"].tolist() == local["step"].tolist() and len(served["step"]) == 2 * 6
    assert served["token"].tolist() == local["token"].tolist()
    for r in cfg.rules:
        assert served[f"exact:{r}"].astype(bool).all()
        assert np.allclose(served[f"cert:{r}"], local[f"cert:{r}"], rtol=0, atol=ENGINES), r
    for column in ("p_top1", "margin", "entropy", "top10_mass"):
        assert np.allclose(served[column], local[column], atol=ENGINES), column


class _DiesAfter(httpx.BaseTransport):
    """The network, until ``requests`` requests have gone through; then the server is unreachable."""

    def __init__(self, requests: int):
        self.left, self.inner = requests, httpx.HTTPTransport()

    def handle_request(self, request):
        self.left -= 1
        if self.left < 0:
            raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)


def test_a_server_that_dies_mid_run_loses_nothing(vllm_url, tmp_path, monkeypatch):
    """The parts finished before the server went away are kept; the rerun asks only for the rest."""
    import functools

    import specert.study.evaluation as evaluation

    cfg = EvalConfig(target=vllm_url, prompts=str(SPEC_BENCH), num_prompts=3, steps=4, batch_size=1,
                     rules=("greedy",), retries=1, concurrency=1)
    real = evaluation.ServedModel
    # /v1/models, a probe (tokenize, completion), 3 tokenizations, one prompt's completion: then it goes away
    monkeypatch.setattr(evaluation, "ServedModel", functools.partial(real, transport=_DiesAfter(7)))
    with pytest.raises(ServedError, match="cannot reach"):
        run_eval(cfg, tmp_path, progress=False)
    kept = sorted(p.name for p in (tmp_path / "steps").iterdir())
    assert kept == ["part-00000.parquet"]
    counting = _DiesAfter(10**6)
    monkeypatch.setattr(evaluation, "ServedModel", functools.partial(real, transport=counting))
    run_eval(cfg, tmp_path, progress=False)
    assert 10**6 - counting.left == 1 + 2 + 3 + 2  # the completions of the two missing prompts only
    assert len(list((tmp_path / "steps").iterdir())) == 3


@pytest.mark.parametrize("case, message", [
    ("down", "cannot reach"),
    ("model", "does not serve model 'nope'"),
    ("too many", "refused the request"),
    ("vocabulary", "ids must lie in"),
    ("timeout", "did not answer within"),
])
def test_failures_are_one_line(vllm_url, tmp_path, case, message):
    """A server that is down, a model it does not serve, more log-probabilities than it allows, a vocabulary that
    is not its own, a request that times out: one line each, and no run folder a rerun could not resume from."""
    cfg = dict(target=vllm_url, prompts=str(SPEC_BENCH), num_prompts=1, steps=2, rules=("greedy",), retries=0)
    if case == "down":
        cfg["target"] = "http://127.0.0.1:9/v1"
    elif case == "model":
        cfg["served_model"] = "nope"
    elif case == "too many":
        cfg["logprobs"], cfg["vocab_size"] = 10**6, 10**6 + 1
    elif case == "vocabulary":
        cfg["vocab_size"] = 1000
    else:
        cfg["timeout"] = 1e-3
    with pytest.raises((ServedError, ValueError), match=message) as err:
        run_eval(EvalConfig(**cfg), tmp_path / case, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / case / "config.json").exists()  # settings recorded only once the inputs are good


def test_replicas_share_the_requests(vllm_url):
    """Two URLs of one model (a replica each) take the requests in turn."""
    seen = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request):
            seen.append(str(request.url))
            return super().handle_request(request)

    local = vllm_url.replace("127.0.0.1", "localhost")
    client = ServedModel(f"{vllm_url},{local}", transport=Recording())
    client.check()
    for _ in range(4):
        client.tokenize([{"role": "user", "content": "hi"}])
    hosts = [u.split("/")[2].split(":")[0] for u in seen[-4:]]
    assert sorted(hosts) == ["127.0.0.1", "127.0.0.1", "localhost", "localhost"]


def test_a_second_served_model_drafts(vllm_url, tmp_path):
    """``served:URL#MODEL`` teacher-forced through prompt log-probabilities: the target's own server as drafter
    drafts the target's greedy token at every step and has KL's lower end about 0; from a top K < V its KL has no
    finite upper end, so no step is certified and none is rejected while certified."""
    cfg = EvalConfig(target=vllm_url, prompts=str(SPEC_BENCH), num_prompts=2, steps=8, logprobs=20,
                     rules=("greedy", "tree:4"), drafters=(f"served:{vllm_url}#smollm2",), decode_prompts=0)
    run_eval(cfg, tmp_path, progress=False)
    steps, drafters = _columns(tmp_path / "steps"), _columns(tmp_path / "drafters")
    assert len(drafters["step"]) == len(steps["step"]) == 2 * 8
    order = np.lexsort((drafters["step"], drafters["prompt_index"]))
    target_order = np.lexsort((steps["step"], steps["prompt_index"]))
    assert drafters["draft_token"][order].tolist() == steps["token"][target_order].tolist()
    assert (np.abs(drafters["kl"]) < 1e-3).all() and np.isinf(drafters["kl_upper"]).all()
    assert drafters["accepted:greedy"].astype(bool).all()
    assert not drafters["certified:greedy"].astype(bool).any()
    assert "Soundness audit: SOUND" in (tmp_path / "report" / "summary.md").read_text()
