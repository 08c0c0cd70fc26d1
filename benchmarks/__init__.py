"""The benchmark harness of hf-sparse-mllm: its command lines, results and README (not part of the library's wheel).

Run the command lines from the repository root as modules (`python -m benchmarks.demo`, `python -m
benchmarks.bench_steps`, `python -m benchmarks.bench_accuracy`) or through `make demo` / `make bench*`, which also
install the harness's own requirements (`benchmarks/requirements.txt`). See `benchmarks/README.md`.
"""

import os

# Everything the harness uses is generated or built from configs: never wait on the network. One tokenizer thread
# per process, since the dataloader worker forks after the tokenizer ran.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
