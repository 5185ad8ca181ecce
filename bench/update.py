"""Update throughput: training tokens/s and MFU of train.accumulate_gradients, padded vs packed micro-batches.

    python bench/update.py --quick                                  # CPU, tiny random model, < 1 min
    python bench/update.py --model_config=qwen2.5-1.5b --samples=64 # GPU: random weights of that shape, bf16, GC on
    python bench/update.py --model_config=qwen2.5-7b --dtype=bf16   # 7B on one 80 GB GPU: bf16 weights and grads

Workload: `samples` sequences, prompt 200 tokens, response lengths drawn log-uniformly in [32, max_response] (a Zoo-like
spread), one mini-batch split into micro-batches of --micro_batch_tokens by train.plan_micro_batches. Tokens/s counts
real (unpadded) prompt+response tokens. MFU = 6 * matmul params * tokens / seconds / peak FLOP/s, matmul params =
all parameters except an untied input embedding (a lookup, no matmul: ~7% of Qwen2.5-7B; a tied one is also the LM
head, so it stays); attention's own flops (QK^T and AV, causal: 6 * layers * width * s^2 per sequence of s tokens,
forward + backward) are NOT in `mfu` and are added in `mfu_with_attn`; gradient checkpointing's recomputed forward is
in neither (it is overhead, not model flops). Peak: H100 / H200 SXM bf16 dense 989e12; on CPU there is no peak to
compare with, so the mfu fields are null and achieved TFLOP/s is printed. "packed" needs a
varlen attention kernel to be fast (flash-attn); on SDPA it is correct but builds a dense block mask. One JSON line
per mode. --dtype=fp32 (default) is train.py's ddp update: fp32 weights and gradients under bf16 autocast (on GPU; 10
bytes/param with autocast's bf16 weight copy, 71 GiB for 7B: too much for one 80 GB GPU next to the activations).
--dtype=bf16 keeps weights and gradients in bf16 (4 bytes/param): the same matmuls as a zero2/zero3 layer's compute.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Policy, attention_impl  # noqa: E402
from train import Config, Samples, accumulate_gradients, mini_batch_weights, plan_micro_batches  # noqa: E402

SHAPES = {  # Qwen2.5 config.json values (no download)
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model_config", default="qwen2.5-1.5b", choices=SHAPES)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max_response", type=int, default=4096)
    p.add_argument("--micro_batch_tokens", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and gradients (see above)")
    p.add_argument("--quick", action="store_true", help="CPU: tiny model, 32 samples, responses <= 256")
    a = p.parse_args()
    if a.quick:
        a.model_config, a.samples, a.max_response, a.micro_batch_tokens, a.repeats = "tiny", 32, 256, 4096, 1
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    attn = attention_impl(device)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device, not on the host
        lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES[a.model_config], max_position_embeddings=32768,
                                          attn_implementation=attn))
    lm = lm.to({"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    n_params = sum(p.numel() for p in lm.parameters())  # all (printed), and those in matmuls (the MFU's)
    matmul_params = n_params - (0 if lm.config.tie_word_embeddings else lm.get_input_embeddings().weight.numel())
    width, layers = lm.config.hidden_size, lm.config.num_hidden_layers
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rlens = [int(math.exp(torch.empty(1).uniform_(math.log(32), math.log(a.max_response), generator=g))) for _ in
             range(a.samples)]
    seqs = [torch.randint(0, V, (200 + r,), generator=g) for r in rlens]
    policy, cfg = Policy(lm), Config(kl_coef=0.0)
    for packed in (False, True):
        s = Samples(seqs=seqs, prompt_lens=[200] * a.samples, adv=torch.randn(a.samples, generator=g),
                    keep=torch.ones(a.samples, dtype=torch.bool), old_logp=[None] * a.samples,
                    ref_logp=[None] * a.samples, pad_id=0, packed=packed)
        plan = plan_micro_batches(list(range(a.samples)), [len(x) for x in seqs], a.micro_batch_tokens, 1, packed)
        w = mini_batch_weights(s, list(range(a.samples)), cfg, device)  # (samples,) token mean: 1 / sum(rlens)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # peak_mem_gib: this mode's
        for _ in range(a.repeats + 1):  # the first run warms up
            lm.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                accumulate_gradients(policy, s, plan, w, 1, cfg, device)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        sec = min(times[1:])
        tokens = sum(len(x) for x in seqs)
        padded_tokens = sum(len(mb) * max(len(seqs[i]) for i in mb) for mb in plan)
        flops = 6 * matmul_params * tokens / sec  # FLOP/s of the matmuls with weights
        attn_flops = sum(6 * layers * width * len(x) ** 2 for x in seqs) / sec  # causal QK^T and AV, fwd + bwd
        print(json.dumps(dict(mode="packed" if packed else "padded", model=a.model_config, attn=attn, dtype=a.dtype,
                              device=torch.cuda.get_device_name() if cuda else "cpu", samples=a.samples,
                              micro_batches=len(plan), tokens=tokens,
                              computed_tokens=tokens if packed else padded_tokens, seconds=round(sec, 3),
                              tokens_per_s=round(tokens / sec, 1), params=n_params, matmul_params=matmul_params,
                              tflops=round(flops / 1e12, 3), mfu=round(flops / 989e12, 4) if cuda else None,
                              mfu_with_attn=round((flops + attn_flops) / 989e12, 4) if cuda else None,
                              peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None)),
              flush=True)


if __name__ == "__main__":
    main()
