"""The persisted ledger: versioned format, merge across processes, in-flight upload state."""
from __future__ import annotations

import json
import logging

from colabkit.ledger import FORMAT, Ledger, ledger_path


def rec(led: Ledger, rel: str, sha: str, t: float | None = None) -> None:
    led.record(rel, remote_path=rel, size=3, sha256=sha, md5="m", remote_id="id-" + rel, local_size=3,
               local_mtime_ns=7, uploaded_at=t)


def test_round_trip_and_format(tmp_path):
    led = Ledger.load(tmp_path, "hub")
    rec(led, "a/b.pt", "s1")
    data = json.loads(ledger_path(tmp_path, "hub").read_text())
    assert data["format"] == FORMAT and data["tier"] == "hub"
    again = Ledger.load(tmp_path, "hub")
    assert again.verified_copy("a/b.pt", "s1")["remote_id"] == "id-a/b.pt"
    assert again.verified_copy("a/b.pt", "other") is None
    assert again.unchanged("a/b.pt", 3, 7) and not again.unchanged("a/b.pt", 3, 8)
    assert again.summary()["files"] == 1


def test_two_writers_do_not_lose_each_others_records(tmp_path):
    one, two = Ledger.load(tmp_path, "drive"), Ledger.load(tmp_path, "drive")
    rec(one, "x", "s1", t=10)
    rec(two, "y", "s2", t=11)
    rec(two, "x", "s3", t=5)   # older than what `one` wrote: the newer record wins
    final = Ledger.load(tmp_path, "drive")
    assert final.get("x")["sha256"] == "s1" and final.get("y")["sha256"] == "s2"
    one.forget("y")
    assert Ledger.load(tmp_path, "drive").get("y") is None


def test_upload_state_survives_a_restart_and_clears(tmp_path):
    led = Ledger.load(tmp_path, "drive")
    led.begin("big.pt", remote_path="big.pt", size=10, sha256="s")
    st = led.upload_state("big.pt")
    assert st.load() is None
    st.save({"session": "https://upload/abc", "offset": 8})
    after = Ledger.load(tmp_path, "drive")  # a new process
    assert after.upload_state("big.pt").load() == {"session": "https://upload/abc", "offset": 8}
    after.begin("big.pt", remote_path="big.pt", size=10, sha256="s")  # same content: the session is kept
    assert after.upload_state("big.pt").load() == {"session": "https://upload/abc", "offset": 8}
    after.begin("big.pt", remote_path="big.pt", size=11, sha256="t")  # new content: a new upload
    assert after.upload_state("big.pt").load() is None
    after.upload_state("big.pt").save({"session": "s2"})
    after.upload_state("big.pt").clear()
    assert Ledger.load(tmp_path, "drive").upload_state("big.pt").load() is None
    rec(after, "big.pt", "t")
    assert Ledger.load(tmp_path, "drive").inflight == {}


def test_corrupt_ledger_is_set_aside(tmp_path, caplog):
    p = ledger_path(tmp_path, "hub")
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="colabkit.ledger"):
        led = Ledger.load(tmp_path, "hub")
    assert led.entries == {}
    assert p.with_name("hub.json.corrupt").read_text() == "{not json"
    assert [r.getMessage() for r in caplog.records] == [
        f"ledger {p} is corrupt; moved aside to {p.with_name('hub.json.corrupt')}, starting empty"]


def test_files_the_tier_deleted_by_itself_are_not_held_nor_sent_again_until_they_change(tmp_path):
    led = Ledger.load(tmp_path, "hub")
    for rel in ("ck/a_step_1/x.distcp", "ck/a_step_1/colabkit-manifest.json", "ck/a_step_2/x.distcp"):
        led.record(rel, remote_path=rel, size=10, sha256="s" + rel, md5=None, remote_id=None, local_size=10,
                   local_mtime_ns=5)
    led.record("ck/a_step_1/", remote_path="ck/a_step_1", size=20, sha256=None, md5=None, remote_id=None,
               local_size=20, local_mtime_ns=5)
    moved = led.pruned_on_tier(["ck/a_step_1/x.distcp", "ck/a_step_1/colabkit-manifest.json"])
    assert sorted(moved) == ["ck/a_step_1/", "ck/a_step_1/colabkit-manifest.json", "ck/a_step_1/x.distcp"]
    again = Ledger.load(tmp_path, "hub")   # saved, and read back by another process
    for lg in (led, again):
        assert lg.get("ck/a_step_1/x.distcp") is None and lg.get("ck/a_step_1/") is None   # not held
        assert lg.verified_copy("ck/a_step_1/x.distcp", "sck/a_step_1/x.distcp") is None
        assert lg.unchanged("ck/a_step_1/x.distcp", 10, 5)          # the same local file: nothing to send
        assert not lg.unchanged("ck/a_step_1/x.distcp", 10, 6)      # saved again: sent again
        assert lg.get("ck/a_step_2/x.distcp") is not None
    again.record("ck/a_step_1/x.distcp", remote_path="ck/a_step_1/x.distcp", size=10, sha256="new", md5=None,
                 remote_id=None, local_size=10, local_mtime_ns=6)
    assert "ck/a_step_1/x.distcp" not in again.pruned and again.verified_copy("ck/a_step_1/x.distcp", "new")
    assert "ck/a_step_1/x.distcp" not in Ledger.load(tmp_path, "hub").pruned
