#!/usr/bin/env python
"""revlit command line: ``python cli.py {fit,validate,test,predict} --config configs/...``."""

from revlit.cli import main

if __name__ == "__main__":
    main()
