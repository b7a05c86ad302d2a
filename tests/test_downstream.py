"""Real downstream clients open the textured exports: Blender imports GLB and OBJ with their texture,
and the Khronos glTF validator finds no error in the GLB.

Each test is skipped (with the reason) where its tool is not installed: Blender
from Debian's ``blender`` package (its glTF importer also needs ``python3-numpy``),
the validator from npm's ``gltf-validator`` (``make install`` puts both in).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.export.config import MeshFormat
from pipeline.export.mesh_files import write_textured_mesh
from pipeline.export.texture import TextureSettings, texture_mesh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _validator_dir() -> Path | None:
    """A node_modules folder holding gltf-validator: $GLTF_VALIDATOR_NODE_PATH, else the venv's (make install)."""
    candidates = [os.environ.get("GLTF_VALIDATOR_NODE_PATH"), REPO / ".venv" / "node" / "node_modules"]
    for c in candidates:
        if c and (Path(c) / "gltf-validator" / "package.json").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def textured_files(tmp_path_factory) -> dict[str, Path]:
    from test_texture import flat_view, grid_quad

    folder = tmp_path_factory.mktemp("downstream")
    vertices, faces = grid_quad(-1, 1, -1, 1, 0.0, 12)
    views = [flat_view(folder, "a.png", (200, 60, 30), (0.0, 0.2, 2.0)),
             flat_view(folder, "b.png", (30, 60, 200), (1.2, 0.0, 1.6))]
    textured = texture_mesh(vertices, faces, views, TextureSettings(size=256))
    out = {}
    for fmt in (MeshFormat.glb, MeshFormat.obj):
        path = folder / "out" / f"mesh.{fmt.value}"
        path.parent.mkdir(exist_ok=True)
        write_textured_mesh(textured.vertices, textured.faces, textured.uv, textured.texture, path, fmt)
        out[fmt.value] = path
    return out


def blender_report(path: Path) -> dict:
    script = HERE / "downstream" / "blender_check.py"
    proc = subprocess.run(["blender", "-b", "--factory-startup", "--python", str(script), "--", str(path)],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECON_BLENDER_REPORT ")]
    assert lines, f"Blender printed no report (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.skipif(shutil.which("blender") is None, reason="Blender is not installed (Debian package blender)")
@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_blender_imports_the_textured_mesh(textured_files, fmt):
    report = blender_report(textured_files[fmt])
    meshes = report["meshes"]
    assert len(meshes) == 1 and meshes[0]["faces"] == 288
    images = meshes[0]["images"]
    assert images and images[0]["size"] == [256, 256] and images[0]["linked_to_base_color"], report
    assert 0.0 <= meshes[0]["uv_min"] and meshes[0]["uv_max"] <= 1.0, report


@pytest.mark.skipif(shutil.which("node") is None or _validator_dir() is None,
                    reason="node or the npm package gltf-validator is not installed")
def test_gltf_validator_finds_no_error(textured_files):
    env = {**os.environ, "NODE_PATH": str(_validator_dir())}
    proc = subprocess.run(["node", str(HERE / "downstream" / "gltf_validate.js"), str(textured_files["glb"])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    issues = json.loads(proc.stdout)
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues


def test_textured_files_exist(textured_files):
    """The files the clients read: the GLB carries its image, the OBJ names its MTL and image."""
    assert textured_files["glb"].stat().st_size > 1000
    obj = textured_files["obj"].read_text()
    assert "mtllib mesh.mtl" in obj and (textured_files["obj"].parent / "mesh_texture.png").is_file()
    assert np.isfinite(np.loadtxt([ln[3:] for ln in obj.splitlines() if ln.startswith("vt ")])).all()
