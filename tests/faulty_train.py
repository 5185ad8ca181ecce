"""train.py with one injected SIGKILL, for test_shard.py: FAULT=update kills rank 1 inside step 3's update;
FAULT=save kills rank 0 while step 3's checkpoint is written (after its files, before the rename). The kill
happens once (a marker file records it), so torchrun --max-restarts brings the job back to finish."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

marker, fault, rank = os.environ["FAULT_MARKER"], os.environ["FAULT"], int(os.environ["RANK"])


def die():
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


if not os.path.exists(marker):
    if fault == "update" and rank == 1:
        real_acc, seen = train.accumulate_gradients, [0]

        def accumulate_gradients(*args, **kwargs):
            seen[0] += 1
            if seen[0] == 2 * 2 + 1:  # 2 mini-batches per step: the first update of step 3
                die()
            return real_acc(*args, **kwargs)
        train.accumulate_gradients = accumulate_gradients
    if fault == "save" and rank == 0:
        real_replace = os.replace

        def replace(src, dst):
            if os.path.basename(dst) == "step_000003":
                die()
            return real_replace(src, dst)
        os.replace = replace
train.main(sys.argv[1:])
