"""`python -m cft_lightning ...` is the `cft` command."""

from cft_lightning.cli import main

if __name__ == "__main__":
    main()
