"""`python -m dpls ...` (and `torchrun -m dpls train ...`)."""

from dpls.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
