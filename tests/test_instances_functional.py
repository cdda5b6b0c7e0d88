"""Several instances on one host or one store: each needs its own queue and its own id."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server import ServerProcess


@pytest.mark.fault
def test_a_second_instance_on_the_same_queue_dir_exits_naming_the_dir_and_the_holder(
    start_server, tmp_path: Path
):
    first = start_server("first", data_dir=tmp_path / "shared")
    assert first.proc is not None
    queue_dir = tmp_path / "shared" / "queue"
    second = ServerProcess(
        tmp_path / "second", env={"LIVECOMMENTS_QUEUE_DIR": str(queue_dir)}, name="second"
    )
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    refusal = [line for line in second.logs().splitlines() if "cannot start" in line]
    assert len(refusal) == 1, second.logs()
    assert str(queue_dir) in refusal[0] and f"pid {first.proc.pid}" in refusal[0]
    assert "Traceback" not in second.logs()
