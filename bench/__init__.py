"""Speed and memory benchmarks, each against a bare baseline measured in the same run."""
