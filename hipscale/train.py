"""Entry point: `deepspeed --module hipscale.train --config C [--set k=v] [--resume auto]` (see training/cli.py)."""
from hipscale.training.cli import main

if __name__ == "__main__":
    main()
