"""Prompt sources: ShareGPT V3 (packaged), Spec-Bench and other JSONL files."""

import json

import pytest

from conftest import SPEC_BENCH
from specert.study.prompts import load_prompts


def test_sharegpt_sample_is_deterministic():
    a = load_prompts("sharegpt", 20, seed=1)
    assert a == load_prompts("sharegpt", 20, seed=1)
    assert a != load_prompts("sharegpt", 20, seed=2)
    assert len(a) == 20 and all(16 <= len(p.text) <= 2000 and p.category == "sharegpt" for p in a)


def test_spec_bench_round_robin_over_categories():
    prompts = load_prompts(str(SPEC_BENCH), 13)
    assert len({p.category for p in prompts}) == 13  # 13 categories, one prompt each
    assert len(load_prompts(str(SPEC_BENCH))) == 480


def test_jsonl_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a b"}, {"text": "c"}, "plain string",
             {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]},
             {"conversations": [{"from": "human", "value": "hi there"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert [p.text for p in load_prompts(str(path))] == ["a b", "c", "plain string", "hello", "hi there"]


@pytest.mark.parametrize("content, message", [("{not json\n", "not JSON"), ('{"foo": 1}\n', "no prompt found"),
                                              ("", "holds no prompts")])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path))


def test_missing_file():
    with pytest.raises(ValueError, match="no such prompt file"):
        load_prompts("/no/such/file.jsonl")


def test_training_chats(tmp_path):
    from specert.study.prompts import training_chats

    path = tmp_path / "t.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n\n'
                    '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
                    '{"text": "plain"}\n"just a string"\n')
    items = training_chats(str(path))
    assert items[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert items[1] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert items[2:] == ["plain", "just a string"]
    assert training_chats(str(path), 2, seed=1) == training_chats(str(path), 2, seed=1)
    path.write_text('{"question": 1}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: give 'messages'"):
        training_chats(str(path))
    with pytest.raises(ValueError, match="no such training text file"):
        training_chats(str(tmp_path / "none.jsonl"))
    chats = training_chats("sharegpt", 3, seed=0)
    assert len(chats) == 3 and all(c[0]["role"] == "user" and len(c) >= 2 for c in chats)
