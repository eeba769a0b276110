"""Evaluation and benchmarks: streaming perplexity, passkey and StreamEval retrieval, throughput and memory.

Each command writes JSON (for machines) and markdown/PNG (for people), with the command line, machine and date,
so every number in docs/results.md can be reproduced (tools/run_results.sh).
"""
