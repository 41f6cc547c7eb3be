"""The helper steps: BusyBox from a pinned Alpine, run over the user's own container mounts."""

from __future__ import annotations

import secrets

import dagger
from dagger import dag

from . import scripts

__all__ = ["mount_cache", "run_script", "toolbox"]


def mount_cache(
    ctr: dagger.Container,
    path: str,
    volume: dagger.CacheVolume,
    sharing: dagger.CacheSharingMode | None,
    owner: str,
) -> dagger.Container:
    """``ctr.with_mounted_cache`` passing ``sharing`` only when the caller chose one."""
    if sharing is None:
        return ctr.with_mounted_cache(path, volume, owner=owner)
    return ctr.with_mounted_cache(path, volume, sharing=sharing, owner=owner)


def toolbox(ctr: dagger.Container) -> dagger.Container:
    """``ctr`` with the helper image as its root filesystem, as root, with a fresh nonce.

    ``with_rootfs`` replaces only the filesystem: the container's mounts (its cache volumes, with
    the sharing and owner they were mounted with) stay, so the helper sees exactly what the user's
    commands see, and no tool from the user's image is needed.
    """
    helper = dag.container().from_(scripts.HELPER_IMAGE).rootfs()
    return (
        ctr.with_rootfs(helper)
        .with_user("0:0")
        .with_workdir("/")
        .with_env_variable("PATH", scripts.HELPER_PATH)
        .with_mounted_cache(scripts.STATE_DIR, dag.cache_volume(scripts.STATE_VOLUME))
        .with_env_variable(scripts.NONCE_ENV, secrets.token_hex(16))
    )


def run_script(ctr: dagger.Container, script: str, *args: str) -> dagger.Container:
    """Run one of :mod:`.scripts`' snippets with positional arguments."""
    return ctr.with_exec(["sh", "-c", script, "sh", *args])
