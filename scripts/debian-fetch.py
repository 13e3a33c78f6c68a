#!/usr/bin/env python3
"""Fetches the .deb files pkgs-debian/packages.nix pins into the cache folder
($NIXERY_DEBIAN_CACHE, default /var/cache/nixery/debs), with apt-get
download only, and checks each against its pinned SHA256. Files already
there and intact are kept. Exits 3, naming them, when Debian's archive no
longer offers some pinned versions (a security update replaced them);
`scripts/setup.sh` then generates the set again from the current index.

    scripts/debian-fetch.py [--set FILE]
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEB = re.compile(
    r'\{ package = "([^"]+)"; version = "([^"]+)"; file = "([^"]+)"; sha256 = "([0-9a-f]{64})"; size = (\d+); \}'
)
BATCH = 64


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(debs, into):
    """apt-get download of `debs` (package, version) into `into`; the ones
    the archive does not offer."""
    gone = []
    for start in range(0, len(debs), BATCH):
        batch = debs[start : start + BATCH]
        command = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
        command += [f"{package}={version}" for package, version in batch]
        result = subprocess.run(command, cwd=into, capture_output=True, text=True)
        if result.returncode != 0:
            missing = set(re.findall(r"(?:version|Version) '([^']+)' for '([^']+)' was not found", result.stderr))
            gone += [(p, v) for p, v in batch if (v, p) in missing]
            if not missing:
                sys.exit(f"debian-fetch: apt-get download failed:\n{result.stderr.strip()}")
            retry = [(p, v) for p, v in batch if (v, p) not in missing]
            if retry:
                gone += download(retry, into)
    return gone


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default=ROOT / "pkgs-debian/packages.nix", type=Path)
    args = parser.parse_args()
    cache = Path(os.environ.get("NIXERY_DEBIAN_CACHE") or "/var/cache/nixery/debs")
    cache.mkdir(parents=True, exist_ok=True)
    pinned = {file: (package, version, digest, int(size))
              for package, version, file, digest, size in DEB.findall(args.set.read_text())}
    wanted = {f: p for f, p in pinned.items() if not (cache / f).exists() or sha256(cache / f) != p[2]}
    if not wanted:
        print(f"debian-fetch: all {len(pinned)} .deb files are in {cache}")
        return
    megabytes = sum(p[3] for p in wanted.values()) / 1e6
    print(f"debian-fetch: fetching {len(wanted)} of {len(pinned)} .deb files ({megabytes:.0f} MB) into {cache}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".partial-") as partial:
        gone = download(sorted((p[0], p[1]) for p in wanted.values()), partial)
        if gone:
            names = ", ".join(f"{p} {v}" for p, v in gone)
            print(f"debian-fetch: Debian's archive no longer offers {names}", file=sys.stderr)
            sys.exit(3)
        by_digest = {sha256(path): path for path in Path(partial).glob("*.deb")}
        for file, (package, version, digest, _) in sorted(wanted.items()):
            if digest not in by_digest:
                sys.exit(f"debian-fetch: {file} ({package} {version}) did not arrive with SHA256 {digest}")
            os.replace(by_digest[digest], cache / file)


if __name__ == "__main__":
    main()
