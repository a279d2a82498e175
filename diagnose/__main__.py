"""`python -m diagnose` (also what `torchrun -m diagnose run ...` executes)."""

from diagnose.cli import main

if __name__ == "__main__":
    main()
