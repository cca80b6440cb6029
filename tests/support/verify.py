"""Independent checks of what landed in the bucket, through the minio client."""

from __future__ import annotations

from minio import Minio

__all__ = ["get_object", "manifests"]


def get_object(client: Minio, bucket: str, key: str) -> bytes:
    response = client.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def manifests(client: Minio, bucket: str) -> list[str]:
    """Keys of every committed upload (its manifest.json), sorted."""
    return sorted(
        o.object_name
        for o in client.list_objects(bucket, prefix="systems/", recursive=True)
        if o.object_name is not None and o.object_name.endswith("/manifest.json")
    )
