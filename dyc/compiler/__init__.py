"""The compiler: checkpoint -> analyse -> budget -> group -> slice -> export -> bundle (DESIGN.md §4).

One module per pass, each a function over plain data (``plan.py``); ``compile.compile_checkpoint``
chains them and ``cli`` holds the ``dyc compile`` / ``dyc verify`` commands. Kept import-light:
``dyc.bundle`` (the loader every runtime uses) imports ``plan`` from here.
"""
