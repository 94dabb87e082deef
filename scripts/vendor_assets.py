"""Fetch the JavaScript the built book needs, so that _build/html renders with no network.

The pages need one library: MathJax 3, to typeset the math. (The "Try it" widgets are plain HTML with a few lines of
inline script, made by `minipeft.viz.explore`, so no page needs require.js or the Jupyter widget manager; plots are
PNG images.) MathJax comes from the npm registry as one pinned tarball, checked against the registry's sha512
integrity hash, and only the files the pages load are unpacked into `_vendor/` (gitignored), which `_config.yml`
copies into the built HTML (`html_extra_path`) and points `mathjax_path` at.

    python scripts/vendor_assets.py          # idempotent: does nothing when _vendor/ matches the pins below
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "_vendor"

# name, version, sha512 integrity (from the registry's metadata), and which files of the tarball the pages use.
PACKAGES = [
    {
        "name": "mathjax",
        "version": "3.2.2",
        "integrity": "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        # the TeX-input, HTML-output bundle; the fonts it loads; the TeX extensions it autoloads (\boldsymbol, ...)
        "keep": ["es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2/", "es5/input/tex/extensions/"],
    },
]
STAMP = VENDOR / "vendored.json"


def tarball_url(name: str, version: str) -> str:
    return f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"


def fetch(package: dict) -> bytes:
    url = tarball_url(package["name"], package["version"])
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    algorithm, expected = package["integrity"].split("-", 1)
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise SystemExit(f"vendor_assets: {url} does not match its pinned {algorithm} integrity hash; refusing it")
    return data


def unpack(package: dict, data: bytes) -> int:
    """Extract the kept files under _vendor/<name>/; returns the bytes written."""
    target = VENDOR / package["name"]
    shutil.rmtree(target, ignore_errors=True)
    written = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("package/")
            wanted = any(path == k or (k.endswith("/") and path.startswith(k)) for k in package["keep"])
            if not member.isfile() or not wanted:
                continue
            out = target / path
            if ".." in Path(path).parts:
                raise SystemExit(f"vendor_assets: unsafe path {member.name} in the tarball")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
            written += member.size
    return written


def main() -> int:
    pins = {p["name"]: p["version"] for p in PACKAGES}
    if STAMP.exists() and json.loads(STAMP.read_text()).get("pins") == pins:
        return 0
    VENDOR.mkdir(exist_ok=True)
    sizes = {}
    for package in PACKAGES:
        data = fetch(package)
        sizes[package["name"]] = {"download_bytes": len(data), "vendored_bytes": unpack(package, data)}
        print(
            f"vendor_assets: {package['name']}@{package['version']}: downloaded {len(data) / 1024:.0f} KB, "
            f"kept {sizes[package['name']]['vendored_bytes'] / 1024:.0f} KB in {VENDOR.relative_to(ROOT)}/"
        )
    STAMP.write_text(json.dumps({"pins": pins, "sizes": sizes}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
