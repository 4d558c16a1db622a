"""Print the project's requirements (base, plus an extra) from pyproject.toml, one per line.

The Dockerfile installs these before it copies any code, so a code change rebuilds only the
last, small layer and never reinstalls torch:  python hack/requirements.py trainer
"""

import sys
import tomllib


def requirements(pyproject: str, extra: str | None) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    if extra:
        extras = project.get("optional-dependencies", {})
        if extra not in extras:
            raise SystemExit(f"no extra {extra!r} in {pyproject}; have: {', '.join(sorted(extras))}")
        reqs += extras[extra]
    return reqs


if __name__ == "__main__":
    print("\n".join(requirements("pyproject.toml", sys.argv[1] if len(sys.argv) > 1 else None)))
