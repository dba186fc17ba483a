# The benchmarks are a script (`make bench`), not tests: keep pytest out of this directory.
collect_ignore_glob = ["*"]
