"""Are two recon output folders the same reconstruction? For refactors that must not change results.

    python bench/compare_runs.py OUT_A OUT_B

Compares, stage by stage, every array of every ``.npz`` file (depth, refine), the sparse
model's points, and the mesh (``mesh.ply``) as sets of vertices and of faces, since
Open3D's marching cubes orders them differently from run to run. Timing entries
(``seconds``, ``cpu_seconds`` in the per-view stats) are left out. Exit status 0 when
everything is identical, 1 otherwise; one line per difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TIMING_KEYS = ("seconds", "cpu_seconds")


def _without_timings(value: np.ndarray) -> object:
    """A per-view ``stats`` JSON string without its timing entries; other arrays as they are."""
    if value.dtype.kind == "U" and value.ndim == 0:
        try:
            data = json.loads(str(value))
        except json.JSONDecodeError:
            return str(value)
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in TIMING_KEYS}
        return data
    return value


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def array_differences(out_a: Path, out_b: Path) -> list[str]:
    """One line per ``.npz`` array that differs (or is missing) between the two folders."""
    problems = []
    for path_a in sorted(out_a.rglob("*.npz")):
        rel = path_a.relative_to(out_a)
        if ".building" in rel.parts:
            continue
        path_b = out_b / rel
        if not path_b.exists():
            problems.append(f"{rel}: missing in {out_b}")
            continue
        with np.load(path_a) as za, np.load(path_b) as zb:
            if set(za.files) != set(zb.files):
                problems.append(f"{rel}: arrays {sorted(za.files)} vs {sorted(zb.files)}")
                continue
            for key in za.files:
                if not _same(_without_timings(za[key]), _without_timings(zb[key])):
                    problems.append(f"{rel}: array {key!r} differs")
    return problems


def mesh_differences(mesh_a: Path, mesh_b: Path) -> list[str]:
    """Compare two meshes as sets: vertices (position, colour) and faces (their corners' positions)."""
    import trimesh

    a, b = trimesh.load(mesh_a, process=False), trimesh.load(mesh_b, process=False)
    if a.vertices.shape != b.vertices.shape or a.faces.shape != b.faces.shape:
        return [f"mesh: {len(a.vertices)} vertices / {len(a.faces)} faces vs {len(b.vertices)} / {len(b.faces)}"]

    def rows(mesh) -> np.ndarray:
        colours = mesh.visual.vertex_colors[:, :3].astype(np.float64) if hasattr(mesh.visual, "vertex_colors") else None
        return mesh.vertices if colours is None else np.hstack([mesh.vertices, colours])

    problems = []
    if not np.array_equal(np.unique(rows(a), axis=0), np.unique(rows(b), axis=0)):
        problems.append("mesh: vertex sets differ")
    corners_a = np.sort(a.vertices[a.faces].reshape(len(a.faces), 9), axis=0)
    corners_b = np.sort(b.vertices[b.faces].reshape(len(b.faces), 9), axis=0)
    if not np.array_equal(corners_a, corners_b):
        problems.append("mesh: face sets differ")
    return problems


def sparse_differences(model_a: Path, model_b: Path) -> list[str]:
    import pycolmap

    ra, rb = pycolmap.Reconstruction(str(model_a)), pycolmap.Reconstruction(str(model_b))
    pa = np.array(sorted(tuple(p.xyz) for p in ra.points3D.values()))
    pb = np.array(sorted(tuple(p.xyz) for p in rb.points3D.values()))
    return [] if pa.shape == pb.shape and np.array_equal(pa, pb) else ["sparse: 3D points differ"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_a", type=Path)
    parser.add_argument("out_b", type=Path)
    args = parser.parse_args()
    problems = array_differences(args.out_a, args.out_b)
    if (args.out_a / "sparse").is_dir() and (args.out_b / "sparse").is_dir():
        problems += sparse_differences(args.out_a / "sparse", args.out_b / "sparse")
    problems += mesh_differences(args.out_a / "mesh.ply", args.out_b / "mesh.ply")
    for line in problems:
        print(line)
    n_arrays = sum(1 for p in args.out_a.rglob("*.npz") if ".building" not in p.parts)
    print("identical" if not problems else f"{len(problems)} differences",
          f"({n_arrays} npz files, sparse model, mesh)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
