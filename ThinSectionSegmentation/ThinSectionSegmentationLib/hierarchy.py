"""Subject-hierarchy placement: results go into the folder of the image they were made from.

In Slicer the Subject Hierarchy module adds an item for every new node; a bare MRML scene (the
tests) has no such observer, so items are created here when missing. Both behave the same.
"""

from __future__ import annotations

import slicer
import vtk


def _sh(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def item_of(node) -> int:
    """The node's subject-hierarchy item, created under the scene if it has none."""
    sh = _sh(node.GetScene())
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def parent_item(node) -> int:
    """The folder (or study/subject) holding the node; the scene item at top level."""
    sh = _sh(node.GetScene())
    return sh.GetItemParent(item_of(node))


def create_folder(scene, name: str, parent: int | None = None) -> int:
    sh = _sh(scene)
    return sh.CreateFolderItem(parent if parent is not None else sh.GetSceneItemID(), name)


def remove_items(scene, nodes, folder: int = 0) -> None:
    """Remove the items of `nodes` (the nodes stay in the scene) and the item `folder` (0: none),
    before the nodes themselves are removed: a bare scene keeps the item of a removed node."""
    sh = _sh(scene)
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)
    if folder:
        sh.RemoveItem(folder, False, True)


def place(node, parent: int) -> None:
    sh = _sh(node.GetScene())
    sh.SetItemParent(item_of(node), parent)


def place_beside(node, reference) -> None:
    """Put `node` in the folder that holds `reference`."""
    place(node, parent_item(reference))


def children_nodes(scene, parent: int) -> list:
    """Data nodes directly under a folder item, in hierarchy order."""
    sh = _sh(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(parent, ids, False)
    nodes = []
    for i in range(ids.GetNumberOfIds()):
        node = sh.GetItemDataNode(ids.GetId(i))
        if node is not None:
            nodes.append(node)
    return nodes


def item_name(scene, item: int) -> str:
    return _sh(scene).GetItemName(item)
