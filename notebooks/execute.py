"""Run every notebook top to bottom and save it with its outputs (`make notebooks`), so a reader sees
the results without running anything. Each runs in a scratch folder (they write runs and figures
relative to where they run); the tests execute them again (tests/test_notebooks.py)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        if "real" in path.stem:  # needs the real-pair studies (`make study-real`)
            continue
        notebook = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as scratch:
            NotebookClient(notebook, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": scratch}}).execute()
        nbformat.write(notebook, path)
        print(f"{path.name}: executed, outputs saved")


if __name__ == "__main__":
    main(sys.argv[1:])
