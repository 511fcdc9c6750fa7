"""`python -m moeserve ...` (and `torchrun ... -m moeserve serve MODEL --tensor-parallel-size N`)."""

from moeserve.cli import main

if __name__ == "__main__":
    main()
