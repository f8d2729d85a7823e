"""`python -m nanoforge …` is the same as the `nanoforge` command (and is what `torchrun -m` runs)."""

from nanoforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
