"""How long the light commands take from a fresh process, against what every command paid before (torch imported).

    python benchmarks/cli_startup.py            # median of 5 runs each

Baselines measured in the same run: `python -c pass` (the interpreter alone) and
`python -c "import torch, transformers"` (the import every command made before `--help`, `sources` and `mappings`
stopped importing torch). Each command's ratio is its time over the torch baseline: below 1 means it starts faster
than a torch import alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "xatl --help": ["--help"],
    "xatl convert --help": ["convert", "--help"],
    "xatl sources": ["sources"],
    "xatl mappings list": ["mappings", "list"],
    "xatl mappings schema": ["mappings", "schema"],
    "xatl convert SRC --bogus (an option error)": ["convert", "x", "--bogus"],
}
CLI = "import sys; from xatl_convert.cli import main; sys.argv = ['xatl', *sys.argv[1:]]; main()"


def seconds(command: list[str], repeats: int) -> float:
    """Median wall time of a fresh process running `command`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    interpreter = seconds([sys.executable, "-c", "pass"], repeats)
    torch_import = seconds([sys.executable, "-c", "import torch, transformers"], repeats)
    print(f"python -c pass: {interpreter:.2f} s; import torch, transformers: {torch_import:.2f} s (baseline)")
    print(f"| command | median of {repeats} | / torch import |")
    print("|---|---:|---:|")
    for name, arguments in COMMANDS.items():
        elapsed = seconds([sys.executable, "-c", CLI, *arguments], repeats)
        print(f"| `{name}` | {elapsed:.2f} s | {elapsed / torch_import:.2f} |")


if __name__ == "__main__":
    main()
