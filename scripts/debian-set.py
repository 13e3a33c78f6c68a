#!/usr/bin/env python3
"""Generates pkgs-debian/packages.nix: Debian bookworm's binary packages that
the set's roots need, one node per package (a dependency cycle is one node),
each with the .deb files it unpacks (name, version, file name, SHA256) and
the nodes it depends on.

Reads the index apt-get update leaves in /var/lib/apt/lists (amd64: main,
updates, security). Dependencies are Pre-Depends and Depends; of `a | b` the
first alternative the index can install; a virtual name through its
provider (by Priority, then name); version constraints and arch qualifiers
are not looked at, and of a package listed in several indexes the highest
version counts. Dependencies on Essential packages that Debian leaves
unsaid are added from pkgs-debian/implied.txt. Same index, same file.

    scripts/debian-set.py [--lists DIR] [--roots FILE] [--output FILE]
"""

import argparse
import gzip
import lzma
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIORITY = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
FIELDS = {"Package", "Version", "Depends", "Pre-Depends", "Provides", "Priority",
          "Filename", "SHA256", "Size", "Installed-Size"}
DEPENDENCY = re.compile(r"\s*([a-z0-9][a-z0-9+.\-]*)")


def index_files(lists):
    """The amd64 Packages files, each once (a plain file over a compressed one)."""
    chosen = {}
    for path in sorted(Path(lists).glob("*_binary-amd64_Packages*")):
        base = re.sub(r"\.(lz4|gz|xz)$", "", str(path))
        if base not in chosen or str(path) == base:
            chosen[base] = path
    if not chosen:
        sys.exit(f"debian-set: no amd64 Packages index in {lists}; run apt-get update")
    return [chosen[base] for base in sorted(chosen)]


def read(path):
    name = str(path)
    if name.endswith(".lz4"):
        data = subprocess.run(["lz4", "-dc", name], check=True, capture_output=True).stdout
    elif name.endswith(".gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".xz"):
        data = lzma.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    return data.decode("utf-8", "replace")


def stanzas(text):
    for block in text.split("\n\n"):
        record, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key in FIELDS:
                    record[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            if key in FIELDS:
                record[key] = value.strip()
        if "Package" in record and "Version" in record and "Filename" in record:
            yield record


def version_key(version):
    """A sort key that orders Debian versions as dpkg does."""
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return (int(epoch or 0), part_key(upstream), part_key(revision))


def part_key(text):
    key = []
    for letters, digits in re.findall(r"([^0-9]*)([0-9]*)", text):
        if not letters and not digits:
            continue
        key.append(tuple(order(c) for c in letters) + (0,))
        key.append(int(digits or 0))
    key.append((0,))
    return key


def order(c):
    if c == "~":
        return -1
    return ord(c) if c.isalpha() else ord(c) + 256


def alternatives(field):
    """'a (>= 1) | b, c:any' -> [['a', 'b'], ['c']]"""
    groups = []
    for clause in field.split(","):
        names = [m.group(1) for alt in clause.split("|") if (m := DEPENDENCY.match(alt))]
        if names:
            groups.append(names)
    return groups


class Index:
    def __init__(self, lists, implied):
        self.implied = implied
        self.packages = {}
        for path in index_files(lists):
            for record in stanzas(read(path)):
                known = self.packages.get(record["Package"])
                if known is None or version_key(record["Version"]) > version_key(known["Version"]):
                    self.packages[record["Package"]] = record
        self.providers = defaultdict(list)
        for name, record in self.packages.items():
            for group in alternatives(record.get("Provides", "")):
                for virtual in group:
                    self.providers[virtual].append(name)
        for names in self.providers.values():
            names.sort(key=lambda n: (PRIORITY.get(self.packages[n].get("Priority"), 3), n))

    def resolve(self, name):
        if name in self.packages:
            return name
        return self.providers[name][0] if self.providers.get(name) else None

    def depends(self, name):
        record, found = self.packages[name], set()
        for field in ("Pre-Depends", "Depends"):
            for group in alternatives(record.get(field, "")):
                target = next((t for t in map(self.resolve, group) if t), None)
                if target and target != name:
                    found.add(target)
        found.update(self.implied.get(name, ()))
        return sorted(found)


def closure(index, roots):
    """Every package the roots need, with its dependencies."""
    graph, todo = {}, sorted(roots)
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = index.depends(name)
            todo.extend(graph[name])
    return graph


def components(graph):
    """Strongly connected components (Tarjan's, iterative), each sorted."""
    number, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in number:
            continue
        work = [(start, iter(graph[start]))]
        number[start] = low[start] = len(number)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in number:
                    number[child] = low[child] = len(number)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], number[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == number[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                found.append(sorted(members))
    return found


def nodes(index, graph):
    """Package -> the node it belongs to, and node -> (members, dependencies).
    A cycle's node is named after the member most depended upon from outside."""
    dependents = defaultdict(set)
    for name, targets in graph.items():
        for target in targets:
            dependents[target].add(name)
    node_of = {}
    for members in components(graph):
        inside = set(members)
        outside = {m: len(dependents[m] - inside) for m in members}
        size = lambda m: int(index.packages[m].get("Installed-Size") or 0)  # noqa: E731
        head = max(members, key=lambda m: (outside[m], size(m), m))
        for member in members:
            node_of[member] = head
    result = {}
    for name in sorted(graph):
        head = node_of[name]
        members, targets = result.setdefault(head, ([], set()))
        members.append(name)
        targets.update(node_of[t] for t in graph[name])
    return node_of, {h: (m, sorted(t - {h})) for h, (m, t) in result.items()}


def nix_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def render(index, roots, node_of, graph):
    lines = [
        "# Generated by scripts/debian-set.py from Debian bookworm's amd64 index",
        "# (main, updates, security): do not edit; run the script again.",
        "{",
        "  # Debian package -> the node that unpacks it.",
        "  packages = {",
    ]
    lines += [f"    {nix_string(p)} = {nix_string(node_of[p])};" for p in sorted(node_of)]
    lines += ["  };", "  nodes = {"]
    for head, (members, targets) in sorted(graph.items()):
        lines.append(f"    {nix_string(head)} = {{")
        lines.append(f"      version = {nix_string(index.packages[head]['Version'])};")
        lines.append("      debs = [")
        for member in members:
            record = index.packages[member]
            lines.append(
                f"        {{ package = {nix_string(member)}; version = {nix_string(record['Version'])};"
                f" file = {nix_string(os.path.basename(record['Filename']))};"
                f" sha256 = {nix_string(record['SHA256'])}; size = {int(record['Size'])}; }}"
            )
        lines.append("      ];")
        lines.append("      depends = [ " + " ".join(nix_string(t) for t in targets) + " ];")
        lines.append("    };")
    lines += ["  };", "}"]
    return "\n".join(lines) + "\n"


def lines(path):
    """The lines of `path` without comments and blank lines."""
    stripped = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in stripped if line]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", default="/var/lib/apt/lists")
    parser.add_argument("--roots", default=ROOT / "pkgs-debian/roots.txt", type=Path)
    parser.add_argument("--output", default=ROOT / "pkgs-debian/packages.nix", type=Path)
    args = parser.parse_args()
    implied = {}
    for package, dependency in map(str.split, lines(ROOT / "pkgs-debian/implied.txt")):
        implied.setdefault(package, []).append(dependency)
    index = Index(args.lists, implied)
    roots = lines(args.roots)
    unknown = [r for r in roots if index.resolve(r) is None]
    if unknown:
        sys.exit(f"debian-set: not in the index: {', '.join(unknown)}")
    graph = closure(index, {index.resolve(r) for r in roots})
    node_of, node_graph = nodes(index, graph)
    text = render(index, roots, node_of, node_graph)
    args.output.write_text(text)
    size = sum(int(index.packages[p]["Size"]) for p in graph)
    print(f"debian-set: {len(graph)} packages in {len(node_graph)} nodes, "
          f"{size / 1e6:.0f} MB of .deb files; wrote {args.output}")


if __name__ == "__main__":
    main()
