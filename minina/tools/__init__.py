"""The tools built on minina's core: training (train, config, checkpoint), datasets (data, corpus), the probe and
recall tasks (probes, recall), the learnability study, the benchmark, the demo, the Triton self-test and the command
line (cli, run as `python -m minina`). They import the core; the core never imports them."""
