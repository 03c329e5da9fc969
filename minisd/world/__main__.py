"""`python -m minisd.world OUT --n 1000 ...`: write a folder of the procedural world (see minisd/world/__init__.py)."""
from . import main

main()
