"""Shared fixtures: tiny byte-level BPE tokenizers and tiny random models, built offline in seconds: Qwen2 (untied,
ChatML tokenizer, no BOS) and Llama (tied embeddings, a tokenizer that puts <s> in front of every text)."""
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["What is 3 + 5? The answer is \\boxed{8}.", "Question:\nAnswer:\nLet's think step by step.",
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
          "0 1 2 3 4 5 6 7 8 9 + - = \\frac{1}{2} Please reason step by step, and put your final answer within"]


def make_tokenizer(vocab_size=320):
    """Byte-level BPE: decode(encode(s)) == s for any string; ChatML specials; pad = eos = <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(tokenizer, seed=0, arch="qwen2", **overrides):
    """arch "qwen2": untied embeddings; "llama": LlamaForCausalLM with tied input and output embeddings."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               tie_word_embeddings=arch == "llama")
    cfg.update(overrides)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(bos_token_id=tokenizer.bos_token_id, **cfg)).float()
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).float()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model folder (weights + tokenizer), as train.py --model=DIR expects."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_model(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


LLAMA_CHAT = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


def make_llama_tokenizer(chat_template=LLAMA_CHAT):
    """Llama-2 style: <s> put in front of every text by the tokenizer, </s> = EOS, no ChatML specials (<|im_start|>
    is plain text), an [INST] chat template that writes <s> itself; "Problem" is not one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["[INST] What is 3 + 5? [/INST] Question: Answer: Let's think step by step."] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="</s>")
    t.chat_template = chat_template
    return t


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A JSONL of the 16 sums a + b, a, b = 0..3 (question, answer), as train.py --data=FILE reads it."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
