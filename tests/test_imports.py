"""What a bare GPU box (torch, transformers, accelerate, tokenizers, safetensors, tqdm) can import: every module of the
GPU path, with pyarrow, math-verify and matplotlib blocked; grading then stops with one line naming the pip command."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed before the imports: any import of these packages (or their submodules) raises ImportError.
BLOCK = """
import sys
BLOCKED = {"pyarrow", "math_verify", "matplotlib"}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the test")

sys.meta_path.insert(0, Block())
"""


def test_gpu_path_imports_without_pyarrow_math_verify_matplotlib():
    code = BLOCK + textwrap.dedent("""
        import rollout, model, distributed, train, eval, logs, reward, data
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert len(data.load_examples("arith", "chatml-short")[0]) == 100  # data without parquet needs no pyarrow
        assert reward.grade_one("so \\\\boxed{8}", "8").reward == 1.0     # settled without math-verify
        try:
            reward.score(["\\\\boxed{8}"], ["8"])
        except ImportError as e:
            print("score:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("score: grading needs the math-verify package") and "pip install math-verify" in line
