"""python -m centra.cli == centra."""

from centra.cli import main_exit

main_exit()
