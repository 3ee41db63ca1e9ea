"""When is GQ worth its cost? The seed-paired decision study on CIFAR-10 (CPU scale).

The study lives in the package ``benchmarks/study`` (one module per concern); its docstring
lists the arms and the commands, and ``python benchmarks/reproduce.py --help`` prints them.
"""

from study.cli import main

if __name__ == "__main__":
    main()
