#!/usr/bin/env python3
"""The README's target table and picture against Package.swift, and every
target's imports against what Package.swift declares for it.

  python3 integration/readme_targets.py [README.md]

Reads the manifest with `swift package dump-package`. Fails (exit 1) naming
each difference: a target missing from the table or the picture, a
dependency the table adds or leaves out, a module a target imports without
declaring it.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Products of other packages, as the README names them.
PACKAGES = {"swift-log": "swift-log", "swift-argument-parser": "swift-argument-parser"}
# Modules of the toolchain and the system: never declared.
SYSTEM = {"Glibc", "Foundation", "Synchronization", "Dispatch", "Testing", "XCTest", "PackageDescription"}


def manifest():
    out = subprocess.run(["swift", "package", "dump-package"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def declared(target):
    deps = set()
    for d in target["dependencies"]:
        if "byName" in d:
            deps.add(d["byName"][0])
        elif "target" in d:
            deps.add(d["target"][0])
        elif "product" in d:
            name, package = d["product"][0], d["product"][1]
            deps.add(PACKAGES.get(package.lower(), package) + ":" + name)
    return deps


def table(readme):
    """{target: set of dependencies} from the "| target | depends on" table."""
    rows = {}
    inside = False
    for line in readme.splitlines():
        if line.startswith("| target | depends on"):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].startswith("---"):
                continue
            name = cells[0].strip("`")
            deps = set()
            for dep in cells[1].split(","):
                dep = dep.strip()
                if dep in ("nothing", ""):
                    continue
                deps.add(dep.strip("`"))
            rows[name] = deps
    return rows


def picture(readme):
    """The text of the code block that follows the target table's heading line."""
    m = re.search(r"The targets, and what depends on what.*?```\n(.*?)```", readme, re.S)
    return m.group(1) if m else ""


def imports(folder):
    mods = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".swift"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    m = re.match(r"^(?:@testable )?import (\w+)\s*$", line)
                    if m:
                        mods.add(m.group(1))
    return mods


def main():
    readme_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    pkg = manifest()
    rows = table(readme)
    drawn = picture(readme)
    problems = []
    def is_swift(t):
        folder = os.path.join(ROOT, t.get("path") or os.path.join("Sources", t["name"]))
        return os.path.isdir(folder) and any(n.endswith(".swift") for n in os.listdir(folder))

    # The Swift targets of Sources/ (not the C shims, not the tests' helpers).
    swift_targets = [t for t in pkg["targets"]
                     if t["type"] in ("regular", "executable") and not t.get("path") and is_swift(t)]
    for t in swift_targets:
        name = t["name"]
        want = {d.split(":")[0] if ":" in d else d for d in declared(t)}
        if name not in rows:
            problems.append(f"{name}: not in the README's target table")
        elif rows[name] != want:
            extra, missing = rows[name] - want, want - rows[name]
            problems.append(f"{name}: the table adds {sorted(extra)} and leaves out {sorted(missing)}")
        if not re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", drawn):
            problems.append(f"{name}: not in the README's target picture")
    for name in set(rows) - {t["name"] for t in swift_targets}:
        problems.append(f"{name}: in the README's table, not a target of Package.swift")
    # Every module a target imports is one it declares (directly).
    for t in pkg["targets"]:
        if t["type"] == "system":
            continue
        folder = t.get("path") or os.path.join("Tests" if t["type"] == "test" else "Sources", t["name"])
        folder = os.path.join(ROOT, folder)
        if not os.path.isdir(folder):
            continue
        have = {d.split(":")[-1] if ":" in d else d for d in declared(t)}
        for mod in sorted(imports(folder) - SYSTEM - {t["name"]}):
            if mod not in have:
                problems.append(f"{t['name']} imports {mod} without declaring it in Package.swift")
    for p in problems:
        print("FAIL", p)
    if problems:
        return 1
    print(f"ok: {len(swift_targets)} targets in the README match Package.swift; every import is declared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
