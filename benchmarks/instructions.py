"""Instructions per exchange frame, tickwire's protocols against cryptofeed 2.3.2's,
counted by valgrind (``--tool=callgrind``): figures that do not move with the
machine's load, for the cases of ``benchmarks/ingest.py``'s part (a).

    python benchmarks/instructions.py                             # Kraken trades and ticker, Coinbase
    python benchmarks/instructions.py --cases "kraken book" --passes 2
    python benchmarks/instructions.py --no-cryptofeed

A script, not a test (it needs ``valgrind``; about 30 s a case and side at the
defaults). Per case and side, the program is run twice under callgrind with
``PYTHONHASHSEED=0``: each makes ``2 + passes`` protocol objects (tickwire's
``feed``; cryptofeed's as ``ingest_cryptofeed.make_feed`` makes it), then
``gc.collect(); gc.freeze()``, then replays the recorded connection on the first
2 of them, or on all (``ingest.tickwire_replay`` and
``ingest_cryptofeed.replay``, the replays ``ingest.py`` times), dropping each
object after its pass. The figure is the difference of the two runs'
instruction counts over ``passes`` and the frames: what a replay
costs, without the interpreter's start, the imports and the making of the
objects. The cryptofeed venv is ``ingest.py``'s (made if missing).

Instructions are not time (the issue's targets are time: ``ingest.py``), but
they say where a change moved the work by a few percent when timings on a
shared machine cannot. Run W3 of docs/benchmarks.md used this method.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def replay_some(feeds: list[Any], replayed: int, replay: Callable[[Any], object]) -> None:
    """``gc.collect(); gc.freeze()``, then ``replay`` the first ``replayed`` of
    ``feeds``, each one dropped after its turn (replayed or not)."""
    gc.collect()
    gc.freeze()
    for i in range(len(feeds)):
        feed, feeds[i] = feeds[i], None
        if i < replayed:
            replay(feed)


def replay_tickwire(name: str, made: int, replayed: int, captures: Path) -> int:
    """Make ``made`` tickwire protocol objects of case ``name``, replay the case on
    the first ``replayed`` (``ingest.tickwire_replay``); returns the case's frame
    count."""
    sys.path[:0] = [str(REPO), str(HERE)]
    import ingest

    case = {c.name: c for c in ingest.load_cases(captures)}[name]
    replay_some([case.new_feed() for _ in range(made)], replayed,
                lambda feed: ingest.tickwire_replay(case, feed))
    return len(case.frames)


def replay_cryptofeed(spec_path: str, made: int, replayed: int) -> int:
    """The same with cryptofeed (run by its venv's Python), from ``ingest``'s case
    spec (JSON), through ``ingest_cryptofeed.replay``; returns the frame count."""
    from collections import Counter

    sys.path.insert(0, str(HERE))
    import ingest_cryptofeed

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    replay_some([ingest_cryptofeed.make_feed(spec, Counter()) for _ in range(made)], replayed,
                lambda feed: ingest_cryptofeed.replay(spec, feed))
    return len(spec["messages"])


def counted(command: list[str], workdir: Path) -> int:
    """Instructions of ``command`` run under callgrind (``PYTHONHASHSEED=0``)."""
    out = workdir / "callgrind.out"
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        capture_output=True, text=True, check=False, cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "0"})
    found = COLLECTED.search(result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(command)} failed under valgrind:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def per_frame(command: list[str], passes: int, frames: int, workdir: Path) -> float:
    """Instructions per frame: the run replaying ``2 + passes`` objects minus the one
    replaying 2, over ``passes`` and ``frames``."""
    made = str(2 + passes)
    many = counted([*command, made, made], workdir)
    few = counted([*command, made, "2"], workdir)
    return (many - few) / passes / frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="kraken trades,kraken ticker,coinbase",
                        help="ingest.py's case names, comma separated")
    parser.add_argument("--passes", type=int, default=20,
                        help="replays counted (the difference between 2 + passes and 2)")
    parser.add_argument("--captures", type=Path, default=Path(
        os.environ.get("TICKWIRE_CAPTURES", REPO / "tests" / "captures")))
    parser.add_argument("--no-cryptofeed", action="store_true")
    parser.add_argument("--cryptofeed-venv", type=Path, default=REPO / ".bench" / "cryptofeed-venv")
    parser.add_argument("--cryptofeed-python", default=sys.executable,
                        help="the interpreter that makes the cryptofeed venv (ingest.py)")
    sub = parser.add_subparsers(dest="child")
    for name in ("_tickwire", "_cryptofeed"):  # what runs under valgrind
        child = sub.add_parser(name)
        child.add_argument("case")
        child.add_argument("made", type=int)
        child.add_argument("replayed", type=int)
    args = parser.parse_args(argv)
    if args.child == "_tickwire":
        replay_tickwire(args.case, args.made, args.replayed, args.captures)
        return
    if args.child == "_cryptofeed":
        replay_cryptofeed(args.case, args.made, args.replayed)
        return

    sys.path[:0] = [str(REPO), str(HERE)]
    import ingest

    cases = {c.name: c for c in ingest.load_cases(args.captures)}
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"no case {unknown}; the cases: {', '.join(cases)}")
    python = None if args.no_cryptofeed else ingest.cryptofeed_python(args)
    script = str(Path(__file__).resolve())
    print(f"instructions per frame, {args.passes} passes, PYTHONHASHSEED=0\n")
    print("| case | frames | tickwire | cryptofeed 2.3.2 | tickwire / cryptofeed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in names:
            case = cases[name]
            frames = len(case.frames)
            ours = per_frame([sys.executable, script, "--captures", str(args.captures),
                              "_tickwire", name], args.passes, frames, workdir)
            theirs = ratio = "-"
            if python is not None:
                spec = workdir / "spec.json"
                spec.write_text(json.dumps(case.spec()))
                value = per_frame([str(python), script, "_cryptofeed", str(spec)],
                                  args.passes, frames, workdir)
                theirs, ratio = f"{value:,.0f}", f"{ours / value:.2f}"
            print(f"| {name} | {frames:,} | {ours:,.0f} | {theirs} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
