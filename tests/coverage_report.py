#!/usr/bin/env python3
"""Reads cargo-tarpaulin's JSON report and prints line coverage per crate and in total, then the
uncovered lines of the files with the most of them (tests/coverage.sh runs this)."""
import json, os, sys

report = json.load(open(sys.argv[1]))
root = os.getcwd()

def crate_of(path):
    """The crate directory a file belongs to: the nearest parent with a Cargo.toml."""
    d = os.path.dirname(path)
    while d.startswith(root) and d != root:
        if os.path.exists(os.path.join(d, "Cargo.toml")):
            return os.path.relpath(d, root)
        d = os.path.dirname(d)
    return "."

crates, files = {}, []
for f in report["files"]:
    path = os.path.join("/", *f["path"]) if f["path"] and f["path"][0] != "/" else os.path.join(*f["path"])
    rel = os.path.relpath(path, root)
    covered, coverable = f["covered"], f["coverable"]
    if coverable == 0:
        continue
    c = crates.setdefault(crate_of(path), [0, 0])
    c[0] += covered
    c[1] += coverable
    missed = [t["line"] for t in f["traces"] if t["stats"].get("Line", 0) == 0]
    files.append((rel, covered, coverable, missed))

def ranges(lines):
    out, start, prev = [], None, None
    for n in sorted(lines):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out)

print(f"\n{'crate':<24} {'lines':>7} {'covered':>8} {'coverage':>9}")
total_c = total_n = 0
for name in sorted(crates):
    c, n = crates[name]
    total_c += c
    total_n += n
    print(f"{name:<24} {n:>7} {c:>8} {100 * c / n:>8.1f}%")
print(f"{'total':<24} {total_n:>7} {total_c:>8} {100 * total_c / total_n:>8.1f}%")

print("\nuncovered lines of the 12 files with the most:")
for rel, c, n, missed in sorted(files, key=lambda f: len(f[3]), reverse=True)[:12]:
    print(f"  {rel} ({100 * c / n:.0f} % of {n}): {ranges(missed)}")
