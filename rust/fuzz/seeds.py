"""Writes the seed corpus of the compiled core's fuzzer (rust/fuzz) into a directory.

The seeds are the bases of tests/integration/test_damage_fuzz.py (tests/unit/damagedfiles.py
makes the generated ones): real tcpdump captures taken on
the loopback interface (where this runs as root with tcpdump and the Wireshark tools; without
them it says so and goes on) and generated ones of every block type, both byte orders and both
timestamp resolutions. Each goes behind the 4-byte header of rust/src/fuzzing.rs in a few
variants (byte order, units, cap, where the capture is cut). Files are named by base and
variant, so that running this again replaces its seeds (the real captures differ each time)
rather than adding to them; what libFuzzer adds is named by digest.

Usage: .venv/bin/python rust/fuzz/seeds.py DIRECTORY
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "unit")]

import damagedfiles  # noqa: E402
import test_damage_fuzz  # noqa: E402

# (flags: bit 0 big-endian, bit 1 nanoseconds; cap: 0, 64, 262144 or unlimited; where to cut:
# a fraction of the capture)
HEADERS = ((0, 2, 0.5), (1, 2, 0.5), (2, 3, 0.25), (3, 1, 0.9))


def header(flags: int, cap: int, split: int) -> bytes:
    return bytes([flags, cap]) + min(split, 0xFFFF).to_bytes(2, "little")


def bases() -> dict[str, bytes]:
    found = damagedfiles.generated()
    tools = ("tcpdump", "editcap", "mergecap")
    if os.geteuid() != 0 or any(shutil.which(tool) is None for tool in tools):
        print(f"seeds: no real captures (they need root and {', '.join(tools)}); "
              "generated ones only", file=sys.stderr)
        return found
    with tempfile.TemporaryDirectory(prefix="msnf-seeds-") as directory:
        try:
            found.update(test_damage_fuzz._loopback_captures(Path(directory)))
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            # Seeds, not a test of tcpdump: the fuzzer goes on with the generated ones.
            print(f"seeds: no real captures this time ({exc!r:.300}); generated ones only",
                  file=sys.stderr)
    return found


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.rstrip().splitlines()[-1])
    into = Path(sys.argv[1])
    into.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, data in bases().items():
        for n, (flags, cap, where) in enumerate(HEADERS):
            seed = header(flags, cap, int(len(data) * where)) + data
            path = into / f"seed-{name}-{n}"
            if not path.exists() or path.read_bytes() != seed:
                path.write_bytes(seed)
                written += 1
    print(f"seeds: {written} seeds written in {into}", file=sys.stderr)


if __name__ == "__main__":
    main()
