"""`python3 -m scenes ...` (with tools/ on the path): the scenes.py CLI."""
import sys

from .scenes import main

sys.exit(main())
