"""``python -m mixmap …``: the command line, also for launchers that take a module
(``torchrun --nproc_per_node 2 -m mixmap fit …``)."""

from mixmap.cli import app

if __name__ == "__main__":
    app(prog_name="mixmap")
