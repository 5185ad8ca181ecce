"""One table of everything bench/gpu.sh measured: python bench/gpu_summary.py [OUT]   (OUT: default /tmp/zero_rl_gpu)

Reads OUT/status.tsv (each part's exit status, seconds, estimate, timeout) and the JSON lines of each part's log
(OUT/<part>.log, lines that parse as a JSON object), and prints, part by part, its status line (and a failed part's
last log line) and one line per JSON object: its label (the first of check / engine / ops / kernels / step_time / mode /
step) and its fields as key=value, less the ones that repeat on every line (device, dtype, prompt_len). Exit 124 = the part ran past its timeout
(137: killed after it). Only the standard library: it runs where the parts failed to import anything.
"""
import json
import os
import sys

LABELS = ("check", "engine", "ops", "kernels", "step_time", "mode", "step")
QUIET = {"device", "dtype", "prompt_len", "goal_per_layer"}


def json_lines(path):
    """The JSON objects among a log's lines."""
    out = []
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/zero_rl_gpu"
    status = os.path.join(out, "status.tsv")
    parts = [line.rstrip("\n").split("\t") for line in open(status)] if os.path.exists(status) else []
    print(f"=== summary of {out}")
    for name, rc, seconds, estimate, limit in parts:
        note = {"0": "ok", "124": "TIMED OUT", "137": "KILLED after timeout"}.get(rc, "FAILED")
        print(f"--- {name}: exit {rc} ({note}), {seconds} s (estimate {estimate}, timeout {limit} s)")
        log = os.path.join(out, f"{name}.log")
        lines = [line.rstrip() for line in open(log, errors="replace") if line.strip()] if os.path.exists(log) else []
        if rc != "0" and lines:  # the error, where there is one
            print(f"    last line: {lines[-1][:300]}")
        for obj in json_lines(log) if os.path.exists(log) else []:
            label = next((f"{k}={obj[k]}" for k in LABELS if k in obj), "-")
            fields = " ".join(f"{k}={json.dumps(v)}" for k, v in obj.items() if k not in QUIET and
                              f"{k}={v}" != label)
            print(f"    [{label}] {fields}")


if __name__ == "__main__":
    main()
