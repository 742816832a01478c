"""Fetch the JavaScript the site serves from its own ``_static`` (no CDN), pinned, into ``book/_static/vendor/``.

    python book/_tools/vendor_js.py          # re-download with `npm pack` and rewrite MANIFEST.json
    python book/_tools/vendor_js.py --check  # verify the committed files against MANIFEST.json (no network)

What is vendored and why:
* MathJax 3 ``tex-svg-full.js``: one file with every TeX extension and SVG output, so no font files or
  lazily loaded extensions are fetched (``sphinx: config: mathjax_path`` points at it).
* RequireJS ``require.js``: the AMD loader the ipywidgets HTML manager needs.
* ``@jupyter-widgets/html-manager`` ``embed-amd.js`` (+ its woff2 icon fonts): draws the stored widget state
  (``nb_ipywidgets_js`` points at it). The built-in widgets are bundled inside it.
plotly.js is not vendored: ``book/_ext/dsv3_site.py`` copies it at build time from the installed ``plotly``
package, so the figures and the library that draws them always come from the same plotly version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "_static" / "vendor"
MANIFEST = VENDOR / "MANIFEST.json"

# npm package spec -> list of (path inside the tarball, path under book/_static/vendor/)
PACKAGES = {
    "mathjax@3.2.2": [
        ("package/es5/tex-svg-full.js", "mathjax/tex-svg-full.js"),
        ("package/LICENSE", "mathjax/LICENSE"),
    ],
    "requirejs@2.3.8": [("package/require.js", "require.js")],
    "@jupyter-widgets/html-manager@1.0.15": [
        ("package/dist/embed-amd.js", "html-manager/embed-amd.js"),
        ("package/dist/*.woff2", "html-manager/"),
        ("package/dist/embed.js.LICENSE.txt", "html-manager/LICENSE.txt"),
    ],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch() -> None:
    if shutil.which("npm") is None:
        sys.exit("vendor_js: npm is not on PATH (apt-get install -y npm, or use a Node.js install)")
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec, members in PACKAGES.items():
            out = (
                subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            root = Path(tmp) / spec.replace("/", "_")
            with tarfile.open(Path(tmp) / out) as tar:
                tar.extractall(root, filter="data")
            for pattern, dest in members:
                sources = sorted(root.glob(pattern))
                if not sources:
                    sys.exit(f"vendor_js: {spec} has no file matching {pattern}")
                for src in sources:
                    target = VENDOR / dest / src.name if dest.endswith("/") else VENDOR / dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, target)
                    rel = target.relative_to(VENDOR).as_posix()
                    files[rel] = {"package": spec, "source": src.relative_to(root).as_posix(), "sha256": sha256(target)}
    tmp_manifest = MANIFEST.with_suffix(".tmp")
    tmp_manifest.write_text(json.dumps(files, indent=1, sort_keys=True) + "\n")
    tmp_manifest.replace(MANIFEST)
    total = sum((VENDOR / f).stat().st_size for f in files)
    print(f"vendored {len(files)} files, {total / 1e6:.1f} MB, into {VENDOR}")


def check() -> list[str]:
    """Problems with the vendored files (missing, modified, unlisted); empty when all is well."""
    if not MANIFEST.exists():
        return [f"{MANIFEST} is missing: run python book/_tools/vendor_js.py"]
    files = json.loads(MANIFEST.read_text())
    problems = []
    for rel, info in files.items():
        path = VENDOR / rel
        if not path.exists():
            problems.append(f"{path} is missing (from {info['package']})")
        elif sha256(path) != info["sha256"]:
            problems.append(f"{path} differs from {info['package']} {info['source']} (sha256 mismatch)")
    for path in VENDOR.rglob("*"):
        rel = path.relative_to(VENDOR).as_posix()
        if path.is_file() and path != MANIFEST and rel not in files:
            problems.append(f"{path} is not listed in {MANIFEST.name}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files, no download")
    args = parser.parse_args()
    if args.check:
        problems = check()
        print("\n".join(problems) or "vendored JavaScript matches MANIFEST.json")
        sys.exit(1 if problems else 0)
    fetch()


if __name__ == "__main__":
    main()
