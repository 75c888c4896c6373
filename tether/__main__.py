"""`python -m tether` is the `tether` command (so launchers such as `torchrun -m tether` find it)."""

from tether.cli import main

main()
