"""``Runtime.build_repository_version``: a repository version built as a load builds it,
neither started nor listed (a restored rollout knows an unloaded one again with it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_rollout_state import config, started, write_repo

from infercore.artifacts import sha256_file
from infercore.errors import ModelNotFound
from infercore.runtime.errors import LoadFailed
from infercore.runtime.repository import UnpinnedArtifact
from infercore.runtime.served import LOADING


def test_a_repository_version_is_built_with_its_pins_and_not_listed(tmp_path: Path) -> None:
    write_repo(tmp_path, "3")
    digest = sha256_file(tmp_path / "repo/v3/model.bin")

    async def scenario() -> None:
        async with started(config(tmp_path, approvals=())) as rt:
            sv = rt.build_repository_version("m", "3")
            assert (sv.name, sv.version, sv.origin, sv.state) == ("m", "3", "repository", LOADING)
            assert sv.node == {"kind": "pinned-fake", "path": "repo/v3/model.bin", "sha256": digest}
            assert sv.path == "models.m.repository.loader"
            assert "3" not in rt.models["m"].versions
            pin = {"path": "repo/v3/model.bin", "sha256": digest}
            assert rt.build_repository_version("m", "3", pin=pin).node == sv.node
            # Loaded by name later, as any repository version: the same node.
            loaded = await rt.load("m", "3", pin=pin)
            assert (loaded.node, loaded.path, loaded.origin) == (sv.node, sv.path, sv.origin)

    asyncio.run(scenario())


def test_building_a_repository_version_refuses_what_a_load_refuses(tmp_path: Path) -> None:
    write_repo(tmp_path, "3")
    (tmp_path / "repo/v4").mkdir()
    (tmp_path / "repo/v4/model.bin").write_text("not pinned\n")

    async def scenario() -> None:
        async with started(config(tmp_path, approvals=())) as rt:
            with pytest.raises(ModelNotFound, match="has no version '9'"):
                rt.build_repository_version("m", "9")
            with pytest.raises(UnpinnedArtifact, match="no digest pinned"):
                rt.build_repository_version("m", "4")
            with pytest.raises(LoadFailed, match="the repository's sha256 is not the one"):
                rt.build_repository_version(
                    "m", "3", pin={"path": "repo/v3/model.bin", "sha256": "0" * 64}
                )

    asyncio.run(scenario())


def test_a_model_without_a_repository_builds_none(tmp_path: Path) -> None:
    cfg = config(tmp_path, approvals=())
    del cfg["models"]["m"]["repository"]

    async def scenario() -> None:
        async with started(cfg) as rt:
            with pytest.raises(ModelNotFound, match="has no repository folder"):
                rt.build_repository_version("m", "3")

    asyncio.run(scenario())
