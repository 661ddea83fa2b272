"""`python -m fashionlab ...`: the command line where the `fashionlab` script is not on PATH
(a virtual environment not activated, a notebook's `!python -m fashionlab`)."""

from fashionlab.console import main

main()
