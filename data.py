"""Prompts and gold answers for GRPO: loading, templating, tokenising, and the rank-sharded sampler.

    template = load_template("qwen-boxed", tokenizer)   # or "chat", a file, "Q: {question}\nA:"; checked
    examples, n_skipped = load_examples("hkust-nlp/SimpleRL-Zoo-Data:simplelr_qwen_level3to5", template)
    prompt_ids, golds, n_too_long = tokenize_examples(examples, tokenizer, max_prompt_len=1024)
    sampler = Sampler(len(prompt_ids), prompts_per_step=1024, seed=0, rank=rank, world=world)
    idx = sampler.next()   # this rank's 1024 // world prompt indices for this step

Accepted `data`:
  - "arith": 100 built-in single-digit additions ("What is 3 + 5?", gold "8"), a = 0..9 outer, b = 0..9 inner;
    arith_split("test") holds 100 two-digit additions held out from them (eval.py's benchmark "arith").
  - FILE.parquet, or a DIRECTORY holding train.parquet, in the verl RL schema of hkust-nlp/SimpleRL-Zoo-Data:
    prompt = [{role, content}] whose content is ALREADY templated (the template is not applied again, but it still
    picks the stop words, so prompts in another of our TEMPLATES are refused), gold = reward_model["ground_truth"].
  - FILE.jsonl, one object per line: question from "question" (else "problem"), gold from "answer" (else "gold"),
    taken verbatim (no \\boxed{} extraction); the template is applied. Blank lines are ignored.
A gold with a GSM8K solution ("... #### 72") becomes the text after its last "####".
  - "HUB_ID:FOLDER" (when no such local path exists): FOLDER/train.parquet of that Hugging Face dataset repo,
    downloaded with huggingface_hub into its cache, then read like a local parquet file.
Skipped and counted (n_skipped): rows whose prompt/question is missing, None, not a string or blank, or whose
gold is missing, None, blank, NaN/inf, or neither a string nor a number (numbers become str(x): 27.0 -> "27.0").
Raised as DataError (one line: the problem and the fix): a bad template (below), missing file, unknown extension,
a parquet file without prompt/reward_model columns, a parquet prompt of several chat messages (a chat template
is not applied here), an invalid JSON line (file and line number), zero usable rows,
a failed hub download, prompts_per_step not a multiple of the world size, all prompts longer than max_prompt_len.
Prompts longer than max_prompt_len tokens are dropped and counted (n_too_long), never silently.

Templates (--template of train.py and eval.py; load_template is the one path, Template.fill the one way a question
becomes a prompt, in training and in eval): a TEMPLATES name; "chat", the tokenizer's own chat template
(apply_chat_template with add_generation_prompt=True, one user message, rendered once with "{question}" in it and
refused unless that equals rendering the question itself; a BOS it writes is dropped where the tokenizer adds one,
so a prompt has one); a path to a text file; or the template itself, a string holding {question} (for several
lines, a file: the flag's "\\n" stays two characters). Filled with
str.replace("{question}", q), not str.format (the literal "\\boxed{}" has braces). Refused, with the fix, before any
model loads: no {question} (every prompt would be the same); a tokenizer without a chat template under "chat";
a <|..|> marker (<|im_start|>, <|im_end|>, ...) that is not one token of the tokenizer (a ChatML template on a Llama
tokenizer: the model would read the marker as text, and with no <|im_end|> token the responses would stop at EOS
only); a stop word (STOP_WORDS) that is not one token: the rollout stops on token ids only, so a word of several
tokens could never stop it (refused rather than cut after decoding, which would still train on the tokens past it).
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch

TEMPLATES = {
    # SimpleRL-Zoo's template for Qwen2.5 models (paper's main runs)
    "qwen-boxed": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}\n"
                  "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                  "<|im_start|>assistant\n",
    # SimpleRL-Zoo's "simple" template for Llama / Mistral / Qwen2.5-0.5B and 1.5B
    "abel": "Question:\n{question}\nAnswer:\nLet's think step by step.\n",
    # short ChatML prompt for the CPU smoke preset
    "chatml-short": "<|im_start|>user\n{question} Put the final answer within \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n",
}
# Extra stop words per template, each one token, on top of EOS and reward.STOP_STRINGS (<|im_end|>, ...).
STOP_WORDS = {"qwen-boxed": [], "abel": ["Question", "Answer", "Problem"], "chatml-short": []}
MARKER = re.compile(r"<\|[^|\s]+\|>")  # a special token written out in a template: <|im_start|>, <|eot_id|>


class DataError(ValueError):
    """Bad data or data config; the message is one line naming the problem and the fix."""


@dataclass
class Template:
    """A prompt template, checked against the tokenizer: load_template."""
    name: str              # --template as given: a TEMPLATES name, "chat", a file path, or the template itself
    text: str              # the prompt with "{question}" where the question goes
    stop_words: list[str]  # one-token stop words on top of EOS and reward.STOP_STRINGS: STOP_WORDS[name], else none

    def fill(self, question: str) -> str:
        """The prompt of one question."""
        return self.text.replace("{question}", question)


def load_template(template: str, tokenizer=None) -> Template:
    """--template (a TEMPLATES name, "chat", a file, or a string holding {question}) -> Template, checked against
    the tokenizer (module docstring); DataError, one line, otherwise. tokenizer None: only the checks that need none
    (and "chat" is refused)."""
    names = f"{', '.join(TEMPLATES)}, chat"
    if template in TEMPLATES:
        text = TEMPLATES[template]
    elif template == "chat":
        if tokenizer is None:
            raise DataError("--template=chat is the tokenizer's chat template: pass load_template('chat', tokenizer)")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--template=chat needs a tokenizer with a chat template, and this one has none; use "
                            f"--template=abel (plain text) or another of {names}")
        render = lambda q: tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                         add_generation_prompt=True)
        text = render("{question}")
        if text.replace("{question}", "What is 3 + 5?") != render("What is 3 + 5?"):
            raise DataError("the tokenizer's chat template does not put the question in as it is; write the prompt "
                            "out in a file and pass --template=FILE")
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]  # tokenizing the prompt adds the BOS: one, not two
    elif os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            text = f.read()
        if "{question}" not in text:
            raise DataError(f"template file {template} has no {{question}}, so every prompt would be the same; "
                            "put {question} where the question goes")
    elif "{question}" in template:
        text = template
    else:
        raise DataError(f"--template={template!r} is not a template name ({names}), not a file, and holds no "
                        "{question}, so every prompt would be the same; put {question} where the question goes")
    words = STOP_WORDS.get(template, [])
    if tokenizer is not None:
        for marker in dict.fromkeys(MARKER.findall(text)):
            n = len(tokenizer(marker, add_special_tokens=False)["input_ids"])
            if n != 1:
                raise DataError(f"--template={template!r} writes {marker}, which is {n} tokens of this tokenizer, not "
                                "one special token: the model would read it as text, and responses would not stop at "
                                "its end marker; use --template=chat (the tokenizer's own chat template) or abel")
        for word in words:
            if word not in tokenizer.get_vocab():
                n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
                raise DataError(f"stop word {word!r} of --template={template!r} is {n} tokens of this tokenizer, and "
                                "the rollout stops on one token only; use --template=chat, or drop the word from "
                                f"data.STOP_WORDS[{template!r}] (responses then stop at EOS)")
    return Template(template, text, words)


@dataclass
class Example:
    prompt: str  # fully templated prompt text
    gold: str    # gold answer string, as given by the data


def _example(prompt, gold):
    """Example, or None when the prompt or gold is unusable (the caller counts it as skipped)."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold) if math.isfinite(gold) else None
    if isinstance(gold, str) and "####" in gold:  # a GSM8K solution: the answer follows its last ####
        gold = gold.rsplit("####", 1)[1].strip()
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(gold, str) or not gold.strip():
        return None
    return Example(prompt, gold)


def _read_parquet(path):
    """(prompt, gold) pairs of a verl-schema parquet file; prompt is already templated."""
    import pyarrow.parquet as pq  # here, not at the top: only parquet data needs pyarrow (a GPU box may lack it)
    names = pq.read_schema(path).names
    if "prompt" not in names or "reward_model" not in names:
        raise DataError(f"{path} has columns {names}, not the verl RL schema (prompt, reward_model); "
                        "use a SimpleRL-Zoo-Data train.parquet or a .jsonl file with question/answer fields")
    pairs = []
    for i, row in enumerate(pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()):
        msgs, rm = row["prompt"], row["reward_model"]
        if isinstance(msgs, list) and len(msgs) > 1:
            raise DataError(f"{path} row {i}: the prompt has {len(msgs)} chat messages, but train.py takes one "
                            "already-templated message per row (SimpleRL-Zoo-Data); flatten the conversation into one")
        prompt = msgs[0].get("content") if msgs and isinstance(msgs[0], dict) else None
        pairs.append((prompt, rm.get("ground_truth") if isinstance(rm, dict) else None))
    return pairs


def _template_of(prompt):
    """The name of the TEMPLATES entry that `prompt` was filled from, or None."""
    for name, t in TEMPLATES.items():
        head, tail = t.split("{question}")
        if isinstance(prompt, str) and prompt.startswith(head) and prompt.endswith(tail):
            return name
    return None


def _read_jsonl(path, template: Template):
    """(templated prompt, gold) pairs of a .jsonl file with question/problem and answer/gold fields."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                pairs.append((None, None))
                continue
            q, gold = (next((row[k] for k in keys if row.get(k) not in (None, "")), None)  # first non-blank field
                       for keys in (("question", "problem"), ("answer", "gold")))
            ok = isinstance(q, str) and q.strip()
            pairs.append((template.fill(q) if ok else None, gold))
    return pairs


def hub_unreachable():
    """None when the Hugging Face hub answers, else why not, in one line: a probe of at most 10 s, where
    huggingface_hub's own downloads retry for about a minute before they fail."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
        return None
    except Exception as e:  # (requests or httpx errors, by huggingface_hub version)
        return f"{constants.ENDPOINT} does not answer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _download(data):
    """Local path of HUB_ID:FOLDER/train.parquet: downloaded with huggingface_hub, or its cached copy when the hub
    does not answer."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo_id, folder = data.split(":", 1)
    fix = (f"download it with `hf download {repo_id} --repo-type dataset --local-dir DIR` where there is "
           f"a network and pass --data=DIR/{folder}")
    if why := hub_unreachable():
        cached = try_to_load_from_cache(repo_id, f"{folder}/train.parquet", repo_type="dataset")
        if isinstance(cached, str):
            return cached
        raise DataError(f"{folder}/train.parquet of dataset {repo_id} is not in the local Hugging Face cache and "
                        f"{why}; {fix}")
    try:
        return hf_hub_download(repo_id, f"{folder}/train.parquet", repo_type="dataset")
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise DataError(f"could not download {folder}/train.parquet from dataset {repo_id} "
                        f"({type(e).__name__}: {msg}); {fix}") from None


def arith_split(split):
    """The built-in addition task as (question, gold) pairs; both splits are fixed (no RNG, no file).
    "train": the 100 single-digit sums "What is a + b?", a = 0..9 outer, b = 0..9 inner (--data=arith).
    "test": 100 held-out two-digit sums a + b, a, b = 10..99: the k-th of the 8,100 ordered pairs (a = 10 + k // 90,
    b = 10 + k % 90) for k = 1237 * i mod 8100, i = 0..99 (1237 is prime to 8100: 100 distinct pairs, b takes every
    value). No test problem is a train problem (both operands have two digits); 49 of them carry into the tens and
    60 sum to 100 or more. So it asks whether what training on single digits teaches carries over to sums the model
    never practised, not whether it recalls them: greedy, SmolLM2-135M-Instruct answers 3 of the 100 before training
    (its rambling runs past 40 tokens or ends on a wrong number; README). eval.py's benchmark "arith"."""
    if split == "train":
        pairs = [(a, b) for a in range(10) for b in range(10)]
    elif split == "test":
        pairs = [(10 + k // 90, 10 + k % 90) for k in (1237 * i % 8100 for i in range(100))]
    else:
        raise DataError(f"unknown arith split {split!r}; use 'train' or 'test'")
    return [(f"What is {a} + {b}?", str(a + b)) for a, b in pairs]


def load_examples(data: str, template: Template | str) -> tuple[list[Example], int]:
    """(examples, n_skipped) from "arith", a .parquet file, a directory with train.parquet, a .jsonl file,
    or "HUB_ID:FOLDER", under `template` (a load_template result, or its --template string); see the module
    docstring for formats and what is skipped."""
    template = load_template(template) if isinstance(template, str) else template
    if data == "arith":
        pairs = [(template.fill(q), gold) for q, gold in arith_split("train")]
    else:
        path = data
        if not os.path.exists(path) and ":" in data:
            path = _download(data)
        if os.path.isdir(path):
            path = os.path.join(path, "train.parquet")
        if not os.path.isfile(path):
            raise DataError(f"no such data file: {path}; pass an existing .parquet/.jsonl file, a directory with "
                            "train.parquet, HUB_ID:FOLDER, or arith")
        if path.endswith(".parquet"):
            pairs = _read_parquet(path)
            for i, (prompt, _) in enumerate(pairs):  # templated already: by the template we were told?
                used = _template_of(prompt)
                if used is not None and TEMPLATES[used] != template.text:
                    raise DataError(f"{path} row {i} is templated with {used!r}, not --template={template.name}; "
                                    f"pass --template={used} (it also picks the stop words)")
        elif path.endswith(".jsonl"):
            pairs = _read_jsonl(path, template)
        else:
            raise DataError(f"unknown data file type: {path}; use a .parquet (verl schema) or .jsonl file")
    examples = [ex for ex in (_example(p, g) for p, g in pairs) if ex is not None]
    if not examples:
        raise DataError(f"no usable rows in {data} ({len(pairs)} rows, all missing a prompt or gold answer); "
                        "check the file's fields (parquet: prompt, reward_model.ground_truth; jsonl: question, answer)")
    return examples, len(pairs) - len(examples)


def tokenize_examples(examples, tokenizer, max_prompt_len) -> tuple[list[list[int]], list[str], int]:
    """(prompt_ids, golds, n_too_long): token ids of each prompt (tokenizer's default special tokens), with the
    prompts longer than max_prompt_len tokens dropped; their count is returned for the caller to log."""
    ids = tokenizer([ex.prompt for ex in examples])["input_ids"]
    keep = [i for i, x in enumerate(ids) if len(x) <= max_prompt_len]
    if not keep:
        raise DataError(f"all {len(examples)} prompts are longer than max_prompt_len={max_prompt_len} tokens; "
                        "raise --max_prompt_len")
    return [ids[i] for i in keep], [examples[i].gold for i in keep], len(examples) - len(keep)


class Sampler:
    """Deterministic, rank-sharded prompt sampler.

    The prompt stream is an endless concatenation of per-epoch permutations of range(n): epoch e is
    torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)). Each step takes the next
    prompts_per_step indices of that stream (running on into the next epoch's permutation, so no prompt is
    skipped; a step that straddles two epochs can hold a prompt twice) and rank r keeps batch[r::world]. The state
    is the global position in the stream, so a resumed run sees the same prompts, even with a different world size
    (same prompts_per_step). train.py --dynamic_sampling calls next() once per generation batch, several a step:
    the position counts every prompt generated, trained on or not."""

    def __init__(self, n: int, prompts_per_step: int, seed: int, rank: int = 0, world: int = 1):
        if n <= 0 or prompts_per_step <= 0:
            raise DataError(f"sampler needs n > 0 prompts and prompts_per_step > 0, got n={n}, "
                            f"prompts_per_step={prompts_per_step}; check the data and --prompts_per_step")
        if prompts_per_step % world != 0:
            raise DataError(f"prompts_per_step={prompts_per_step} is not divisible by the world size {world}; "
                            f"pick a multiple of {world}")
        assert 0 <= rank < world, f"rank {rank} outside world size {world}"
        self.n, self.prompts_per_step, self.seed, self.rank, self.world = n, prompts_per_step, seed, rank, world
        self.pos = 0                  # prompts consumed so far by all ranks together
        self._perm = (-1, [])         # (epoch, its permutation), cached

    def _order(self, epoch):
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def next(self) -> list[int]:
        """This rank's indices for the next step: prompts_per_step // world of them."""
        batch = []
        while len(batch) < self.prompts_per_step:
            epoch, i = divmod(self.pos, self.n)
            take = min(self.prompts_per_step - len(batch), self.n - i)
            batch += self._order(epoch)[i:i + take]
            self.pos += take
        return batch[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.pos // self.n, "n": self.n, "seed": self.seed}  # plain ints

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise DataError(f"sampler checkpoint was over {state['n']} prompts but this run has {self.n}; "
                            "resume with the same --data and --max_prompt_len")
        if state.get("seed", self.seed) != self.seed:  # another permutation would replay some prompts, skip others
            raise DataError(f"sampler checkpoint was written with --seed={state['seed']}; resume with that --seed")
        self.pos = int(state["pos"])

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed (all ranks together), for logging."""
        return self.pos / self.n
