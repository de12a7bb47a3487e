"""Standard output for a command's results alone, so `cmd --json > out.json` is always a valid document."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO


@contextmanager
def results_stdout() -> Iterator[TextIO]:
    """Yield a stream on the process's real standard output; everything else printed meanwhile goes to stderr.

    Inside the block file descriptor 1 and ``sys.stdout`` both point at standard error, so a library's
    notice (DeepSpeed's accelerator detection, a C++ warning, a stray ``print``) cannot land between the
    results, whether it is written from Python or from native code. The yielded stream is flushed and the
    real standard output restored on the way out, also when the block raises or calls ``sys.exit``.
    """
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    previous, sys.stdout = sys.stdout, sys.stderr
    results = os.fdopen(os.dup(real_stdout), "w", encoding="utf-8")
    try:
        yield results
    finally:
        results.close()
        sys.stdout = previous
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def print_folder_reports(folders: Iterable, check: Callable[[object], dict], print_text: Callable[[dict, TextIO], None],
                         as_json: bool) -> list[dict]:
    """The reports of `check` on each folder (the verify commands), printed on standard output as each comes
    (`print_text`), or all at the end as one JSON document {"folders": [report, ...]}."""
    with results_stdout() as out:
        reports = []
        for folder in folders:
            reports.append(check(folder))
            if not as_json:
                print_text(reports[-1], out)
        if as_json:
            print(json.dumps({"folders": reports}, indent=1), file=out)
    return reports
