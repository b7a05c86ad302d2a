"""Run inside Blender: ``blender -b --factory-startup --python blender_check.py -- MESH_FILE``.

Imports a GLB or OBJ the way a user would (Blender's own importers) and prints
one JSON line: the meshes, whether a material carries an image texture (and the
image's size), and the range of the UVs.
"""

import json
import sys

import bpy  # noqa: F401 - Blender's own module

try:  # Debian's Blender 3.4 glTF importer still uses np.bool, which NumPy 1.24 removed: give it back.
    import numpy

    if not hasattr(numpy, "bool") or numpy.bool is not bool:
        numpy.bool = bool
except ImportError:
    pass

path = sys.argv[sys.argv.index("--") + 1]
bpy.ops.wm.read_factory_settings(use_empty=True)
if path.lower().endswith(".glb"):
    bpy.ops.import_scene.gltf(filepath=path)
elif hasattr(bpy.ops.wm, "obj_import"):
    bpy.ops.wm.obj_import(filepath=path)
else:
    bpy.ops.import_scene.obj(filepath=path)
report = {"meshes": [], "blender": bpy.app.version_string}
for obj in bpy.data.objects:
    if obj.type != "MESH":
        continue
    mesh = obj.data
    uvs = []
    if mesh.uv_layers.active is not None:
        uvs = [c for loop in mesh.uv_layers.active.data for c in loop.uv]
    images = []
    for slot in obj.material_slots:
        material = slot.material
        if material is None or not material.use_nodes:
            continue
        for node in material.node_tree.nodes:
            if node.type == "TEX_IMAGE" and node.image is not None:
                images.append({"name": node.image.name, "size": list(node.image.size),
                               "linked_to_base_color": any(link.to_socket.name == "Base Color"
                                                           for link in node.outputs["Color"].links)})
    report["meshes"].append({"name": obj.name, "faces": len(mesh.polygons), "images": images,
                             "uv_min": min(uvs) if uvs else None, "uv_max": max(uvs) if uvs else None})
print("RECON_BLENDER_REPORT " + json.dumps(report))
