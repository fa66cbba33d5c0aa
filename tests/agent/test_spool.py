"""The disk spool: order, acknowledgement across reopen, rotation, damaged tails, one owner."""

from __future__ import annotations

import logging

import pytest

from logitwatch.agent.transport.spool import BATCH, RUN, Spool, SpoolBusy, read_state, write_state


def _drain(spool: Spool) -> list[bytes]:
    out = []
    while (rec := spool.peek()) is not None:
        out.append(rec.data)
        spool.ack(rec)
    return out


def test_fifo_order_and_kinds(tmp_path):
    with Spool(tmp_path) as s:
        s.append(RUN, b'{"config": {}}')
        for i in range(5):
            s.append(BATCH, b"batch %d" % i)
        assert s.pending() == 6
        rec = s.peek()
        assert (rec.kind, rec.data) == (RUN, b'{"config": {}}')
        assert s.peek().data == rec.data  # peek does not consume
        s.ack(rec)
        assert _drain(s) == [b"batch %d" % i for i in range(5)]
        assert s.pending() == 0 and s.peek() is None


def test_progress_survives_reopen_and_new_records_go_after(tmp_path):
    with Spool(tmp_path) as s:
        for i in range(4):
            s.append(BATCH, b"%d" % i)
        s.ack(s.peek())
    with Spool(tmp_path) as s:
        assert s.pending() == 3
        s.append(BATCH, b"new")
        assert _drain(s) == [b"1", b"2", b"3", b"new"]


def test_rotates_files_and_deletes_delivered_ones(tmp_path):
    with Spool(tmp_path, file_bytes=100) as s:
        for i in range(20):
            s.append(BATCH, bytes(40) + b"%d" % i)
        assert len(list(tmp_path.glob("*.spool"))) >= 5
        assert [d[40:] for d in _drain(s)] == [b"%d" % i for i in range(20)]
        assert len(list(tmp_path.glob("*.spool"))) <= 1  # only the one being written


def test_truncated_tail_is_skipped_with_one_warning(tmp_path, caplog):
    with Spool(tmp_path) as s:
        for i in range(3):
            s.append(BATCH, b"record %d" % i)
    path = next(tmp_path.glob("*.spool"))
    path.write_bytes(path.read_bytes()[:-4])  # a crash in the middle of the last write
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"), Spool(tmp_path) as s:
        assert s.pending() == 2
        s.append(BATCH, b"after restart")  # a new file: never appended behind the damage
        assert _drain(s) == [b"record 0", b"record 1", b"after restart"]
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1


def test_corrupted_record_fails_its_checksum(tmp_path, caplog):
    with Spool(tmp_path) as s:
        s.append(BATCH, b"good")
        s.append(BATCH, b"flipped")
    path = next(tmp_path.glob("*.spool"))
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"), Spool(tmp_path) as s:
        assert _drain(s) == [b"good"]
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_failed_write_leaves_no_half_record(tmp_path, monkeypatch):
    import errno

    import logitwatch.agent.transport.spool as spool_mod

    real = spool_mod._write_all
    with Spool(tmp_path) as s:
        s.append(BATCH, b"one")

        def half_then_enospc(fd, data):  # fake filesystem: the disk fills mid-record
            real(fd, data[:5])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(spool_mod, "_write_all", half_then_enospc)
        with pytest.raises(OSError):
            s.append(BATCH, b"two")
        monkeypatch.setattr(spool_mod, "_write_all", real)
        s.append(BATCH, b"three")
        assert _drain(s) == [b"one", b"three"]


def test_one_owner_at_a_time(tmp_path):
    with Spool(tmp_path), pytest.raises(SpoolBusy, match="in use"):
        Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


def test_state_file_round_trips(tmp_path):
    assert read_state(tmp_path / "none") == {}
    write_state(tmp_path / "d", {"run": "r", "max_segment": 2, "last_step": 99})
    assert read_state(tmp_path / "d") == {"run": "r", "max_segment": 2, "last_step": 99}
    (tmp_path / "d" / "state.json").write_text("{garbage")
    assert read_state(tmp_path / "d") == {}
