"""A model folder as loaders read it: modelaware's rules over the listing.

Which listed files a loader reads next (the shard after one, a model's small
files), and which shards a checkpoint's index names; the open path
(handles.py) fetches them ahead or waits for them whole.  Looked up on the
trio thread, in the catalog's tree, with no request.
"""

from __future__ import annotations

from lazyfs import modelaware
from lazyfs.catalog import Catalog
from lazyfs.namespace import DirNode, RemoteObject


def _folder(catalog: Catalog, obj: RemoteObject) -> DirNode | None:
    found = catalog.tree.find(obj.key.rpartition("/")[0])
    return found if isinstance(found, DirNode) else None


def next_shard(catalog: Catalog, obj: RemoteObject) -> RemoteObject | None:
    """The listed shard after `obj` in its folder (modelaware.next_shard)."""
    folder = _folder(catalog, obj) if modelaware.is_safetensors(obj.key) else None
    if folder is None:
        return None
    key = modelaware.next_shard(obj.key, list(folder.names))
    found = catalog.tree.find(key) if key else None
    return found if isinstance(found, RemoteObject) else None


def companions(catalog: Catalog, obj: RemoteObject) -> list[RemoteObject]:
    """The listed small files to fetch when `obj` is opened (modelaware.companions)."""
    folder = _folder(catalog, obj)
    if folder is None or not modelaware.may_have_companions(obj.name, len(folder.children)):
        return []
    files = {name: node.size for name, node in folder.children.items() if isinstance(node, RemoteObject)}
    found = (catalog.tree.find(key) for key in modelaware.companions(obj.key, files))
    return [node for node in found if isinstance(node, RemoteObject)]


def index_shards(catalog: Catalog, obj: RemoteObject) -> list[RemoteObject]:
    """The listed shards of the checkpoint whose index `obj` is
    (modelaware.index_shards); none when `obj` is no index."""
    folder = _folder(catalog, obj) if modelaware.is_index(obj.name) else None
    if folder is None or len(folder.children) > modelaware.COMPANION_FOLDER_MAX:
        return []
    found = (folder.children.get(name) for name in modelaware.index_shards(obj.name, list(folder.names)))
    return [node for node in found if isinstance(node, RemoteObject)]
