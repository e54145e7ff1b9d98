#!/usr/bin/env python3
"""Write a throwaway wrapper go.mod that builds an upstream main module with `replace` lines.

`go install pkg@version` refuses modules whose go.mod has relative `replace` lines
(k8s.io/kubernetes, etcd's server). The wrapper requires the upstream module, copies
its non-relative replace and exclude lines, and maps each relative replace to the published
module: the version upstream requires when it is a real one, else `--default-version`.

usage: gomod_wrapper.py UPSTREAM_GO_MOD MODULE VERSION DEFAULT_VERSION GO_VERSION > go.mod
"""
import re
import sys


def parse_directives(text):
    """Yield (directive, body) for every line of every block of a go.mod."""
    block = None
    for raw in text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if block:
            if line == ")":
                block = None
            else:
                yield block, line
            continue
        m = re.match(r"^(require|replace|exclude|retract)\s*\($", line)
        if m:
            block = m.group(1)
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:
            yield parts[0], parts[1]


def main():
    upstream_path, module, version, default_version, go_version = sys.argv[1:6]
    with open(upstream_path, encoding="utf-8") as f:
        text = f.read()
    required = {}
    replaces, excludes = [], []
    for directive, body in parse_directives(text):
        if directive == "require":
            fields = body.split()
            required[fields[0]] = fields[1]
        elif directive == "replace":
            left, right = [s.strip() for s in body.split("=>")]
            replaces.append((left, right))
        elif directive == "exclude":
            excludes.append(body)

    out = ["module logpipe.local/wrapper", "", f"go {go_version}", "", f"require {module} {version}", ""]
    for left, right in replaces:
        target = right.split()[0]
        if target.startswith("./") or target.startswith("../"):
            path = left.split()[0]
            if path not in required:
                # A guard against bad imports (etcd's ./FORBIDDEN_DEPENDENCY): not needed.
                continue
            pinned = required[path]
            if pinned.startswith("v0.0.0-00010101") or pinned == "v0.0.0":
                pinned = default_version
            out.append(f"replace {path} => {path} {pinned}")
        else:
            out.append(f"replace {left} => {right}")
    for body in excludes:
        out.append(f"exclude {body}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
