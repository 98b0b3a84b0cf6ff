"""Peak memory of forward+backward, lstmkit vs torch.nn.LSTM, one fresh process per run.

    python benchmarks/memory.py [--threads 2]

Each child imports torch and lstmkit, runs one tiny forward+backward (so kernels and
allocator pools are loaded), resets the kernel's peak-RSS counter (/proc/self/clear_refs),
then runs the case's forward+backward and reports VmHWM - VmRSS-before. The same code is
`lstmkit bench --memory`; the cases are those of `lstmkit bench` (issue 3's table).
"""
import argparse
import sys

from lstmkit.cli.bench import memory_table

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    memory_table(ap.parse_args().threads)
    sys.exit(0)
