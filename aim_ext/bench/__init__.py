"""aim-bench: latency, throughput and memory of AIM models against their vanilla backbones, in
several runtimes, from one run (`aim_ext.cli.bench` is the command line)."""
