"""Damaged inputs of issue 9, one minimal hand-made file each: no traceback, no packet lost that
mergecap keeps, nothing written that a reader would call damaged, one sentence per damage.

That capinfos reads every output to its end and that mergecap keeps no more packets is checked
on the same files in tests/integration/test_damage_fuzz.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import capturefiles as cf
import damagedfiles as df
import pytest
from test_pcap_reading import decode, read_all

from multisniff.cli import main
from multisniff.errors import ExitCode
from multisniff.pcap.reading import CaptureReader, CorruptCaptureError

pytestmark = pytest.mark.usefixtures("pcap_core")


def merged(tmp_path: Path, data: bytes) -> tuple[int, bytes]:
    source = tmp_path / "in.pcapng"
    source.write_bytes(data)
    out = tmp_path / "out.pcapng"
    code = main(["merge", str(source), "-o", str(out)])
    return code, out.read_bytes()


def inspected(tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]) -> tuple[
        int, dict[str, object]]:
    source = tmp_path / "in.pcapng"
    source.write_bytes(data)
    code = main(["inspect", str(source), "--json"])
    return code, json.loads(capsys.readouterr().out)


def reread(data: bytes) -> tuple[CaptureReader, list[tuple[int, int, bytes, int, bytes]]]:
    """Our own output read back: it must be sound from end to end."""
    reader, batches = read_all(data)
    assert reader.finish() is None
    assert reader.recovered_count == 0
    return reader, [decode(packet) for batch in batches for packet in batch.packets]


def messages(caplog: pytest.LogCaptureFixture, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == level]


# --- 1 and 2: if_tsoffset that moves timestamps out of 64 bits ---------------------------------


@pytest.mark.parametrize("build", [df.packet_block_offset_below_zero,
                                   df.packet_block_offset_beyond_64_bits,
                                   df.epb_offset_below_zero])
def test_an_offset_that_moves_timestamps_out_of_64_bits_keeps_every_packet(
        build: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = build()  # type: ignore[operator]
    _, inputs = read_all(data)
    code, out = merged(tmp_path, data)
    assert code == ExitCode.OK
    reader, packets = reread(out)
    # the timestamps are the input's, the offset stays on the interface for readers to add
    [offset] = {info.tsoffset for info in read_all(data)[0].interfaces}
    assert [info.tsoffset for info in reader.interfaces] == [offset]
    assert [(ts, payload) for _, ts, payload, _, _ in packets] == [
        (ts, payload) for _, ts, payload, _, _ in (decode(p) for b in inputs for p in b.packets)]
    code, document = inspected(tmp_path, data, capsys)
    assert code == ExitCode.OK
    [interface] = document["interfaces"]  # type: ignore[attr-defined]
    first = int(min(ts for _, ts, _, _, _ in packets)) + offset * 10**6
    assert interface["first"] == f"{'-' if first < 0 else ''}{abs(first) // 10**6}." \
                                 f"{abs(first) % 10**6:06d}"


def test_a_packet_block_below_zero_is_told_the_offset_not_refused() -> None:
    reader, batches = read_all(df.packet_block_offset_below_zero())
    assert reader.finish() is None
    keys = [key for batch in batches for key in batch.keys]
    assert keys == [(5 - 10 * 10**6) * 1000, (20_000_000 - 10 * 10**6) * 1000]


@pytest.mark.parametrize("which", ["timestamp", "starttime", "endtime"])
def test_statistics_whose_times_leave_64_bits_with_the_offset_are_written_as_they_are(
        which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = df.statistics_offset_out_of_range(which)
    code, out = merged(tmp_path, data)
    assert code == ExitCode.OK
    _, inputs = read_all(data)
    _, outputs = read_all(out)
    [given] = [s for batch in inputs for s in batch.statistics]
    [written] = [s for batch in outputs for s in batch.statistics]
    assert written == given
    assert inspected(tmp_path, data, capsys)[0] == ExitCode.OK


# --- 3: options are checked before they are carried over --------------------------------------


def test_an_option_running_past_its_block_is_left_out_and_the_packet_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, out = merged(tmp_path, df.epb_option_past_its_block())
    assert code == ExitCode.PARTIAL
    [warning] = messages(caplog, "WARNING")
    assert warning.endswith(
        f"in.pcapng is damaged at byte {df.OPTION_BLOCK_AT} (option 1 of an enhanced packet "
        "block claims 255 bytes, but only 56 are left in the block); that option was left "
        "out, and reading went on.")
    assert not messages(caplog, "ERROR")
    _, packets = reread(out)
    assert [(ts, payload, options) for _, ts, payload, _, options in packets] == [
        (1, b"a", b""), (2, b"", b""), (3, b"c", b"")]


@pytest.mark.parametrize(("code", "value", "kept"), [
    (2, struct.pack("<I", 7), True),  # epb_flags, 4 bytes
    (2, b"\7\0", False),  # epb_flags of 2 bytes: Wireshark calls the file damaged
    (4, bytes(4), False),  # epb_dropcount must have 8
    (7, b"", False),  # epb_verdict needs its type
    (7, b"\1" + bytes(8), True),  # a Linux tc verdict: 8 bytes after the type
    (7, b"\1" + bytes(4), False),
    (2988, b"\0\0", False),  # a custom option needs its Private Enterprise Number
    (1, b"any comment", True),
])
def test_an_option_wireshark_refuses_is_not_carried_over(code: int, value: bytes,
                                                         kept: bool) -> None:
    blob = cf.shb() + cf.idb() + cf.epb(0, 1, b"data", opts=[(1, b"first"), (code, value)])
    reader, batches = read_all(blob)
    [(_, _, _, _, options)] = [decode(p) for batch in batches for p in batch.packets]
    expected = [(1, b"first"), (code, value)] if kept else [(1, b"first")]
    assert options == cf.options(expected)
    assert reader.recovered_count == (0 if kept else 1)


def test_an_endofopt_with_a_length_is_not_copied() -> None:
    area = cf.options([(1, b"x")])[:-4] + struct.pack("<HH", 0, 5)
    body = struct.pack("<IIIII", 0, 0, 1, 1, 1) + b"a\0\0\0" + area
    _, batches = read_all(cf.shb() + cf.idb() + cf.block(6, body))
    [(_, _, _, _, options)] = [decode(p) for batch in batches for p in batch.packets]
    assert options == cf.options([(1, b"x")])


def test_idb_and_nrb_options_are_checked_too() -> None:
    blob = (cf.shb() + cf.idb(name="eth0", extra=[(11, b""), (2989, b"\1")])
            + cf.block(4, b"\0\0\0\0" + struct.pack("<HH", 2988, 2) + b"ab\0\0")
            + cf.epb(0, 1, b"a"))
    reader, batches = read_all(blob)
    assert reader.finish() is None
    [info] = reader.interfaces
    assert (info.name, info.filter, info.other_options) == ("eth0", None, ())
    [names] = [n for batch in batches for n in batch.names]
    assert names.options == ()
    assert reader.recovered_count == 2


# --- 4: the per-link-type maximum --------------------------------------------------------------


def test_a_packet_longer_than_wireshark_reads_for_its_link_type_is_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, out = merged(tmp_path, df.packet_of_16_mib())
    assert code == ExitCode.PARTIAL
    [warning] = messages(caplog, "WARNING")
    assert (f"damaged at byte {df.OPTION_BLOCK_AT} (a packet of 16777184 captured bytes is "
            "longer than the 262144 that Wireshark reads for link type 1); the block was "
            "left out, and reading went on.") in warning
    _, packets = reread(out)
    assert [payload for _, _, payload, _, _ in packets] == [b"a", b"c"]


@pytest.mark.parametrize(("linktype", "size", "kept"), [
    (1, 262_144, True), (1, 262_145, False), (101, 262_145, False),
    (231, 300_000, True),  # D-Bus: 128 MiB
    (249, 300_000, True),  # USBPcap: 128 MiB
    (279, 8 * 1024 * 1024, True), (279, 8 * 1024 * 1024 + 4, False),  # EBHSCR: 8 MiB
])
def test_the_maximum_is_wiresharks_for_each_link_type_in_pcapng(linktype: int, size: int,
                                                                kept: bool) -> None:
    blob = cf.shb() + cf.idb(linktype=linktype) + cf.epb(0, 1, bytes(size)) + cf.epb(0, 2, b"")
    reader, batches = read_all(blob)
    assert reader.finish() is None
    assert len([p for batch in batches for p in batch.packets]) == (2 if kept else 1)


@pytest.mark.parametrize(("linktype", "size", "kept"), [
    (1, 262_144, True), (1, 262_145, False), (231, 300_000, True),
])
def test_the_same_maximum_holds_for_classic_pcap(linktype: int, size: int, kept: bool) -> None:
    blob = cf.pcap_file([(1, 0, bytes(size), size), (2, 0, b"x", 1)], linktype=linktype)
    reader, batches = read_all(blob)
    if kept:
        assert reader.finish() is None
        assert len([p for batch in batches for p in batch.packets]) == 2
    else:
        assert isinstance(reader.error, CorruptCaptureError)
        assert reader.error.reason == (f"a packet record claims {size} captured bytes, more "
                                       f"than the 262144 that can be read for link type "
                                       f"{linktype}")


# --- 5: go on where mergecap goes on ----------------------------------------------------------


def test_statistics_for_a_missing_interface_are_left_out_and_reading_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, out = merged(tmp_path, df.statistics_for_a_missing_interface())
    assert code == ExitCode.PARTIAL
    assert len(reread(out)[1]) == 50
    offset = df.EPB_AT + 19 * len(cf.epb(0, 0, b"p"))
    [warning] = messages(caplog, "WARNING")
    assert warning.endswith(f"is damaged at byte {offset} (statistics refer to interface 4, "
                            "but the section declares 1 interface); the block was left out, "
                            "and reading went on.")


def test_names_without_end_record_are_left_out_and_reading_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = merged(tmp_path, df.names_without_end_record())
    assert code == ExitCode.PARTIAL
    assert len(reread(out)[1]) == 7
    offset = df.EPB_AT + 3 * len(cf.epb(0, 0, b"p"))
    [warning] = messages(caplog, "WARNING")
    assert f"damaged at byte {offset} (a name resolution block has no end record)" in warning
    code, document = inspected(tmp_path, df.names_without_end_record(), capsys)
    assert code == ExitCode.PARTIAL and document["packets"] == 7


def test_a_pcap_header_with_a_later_major_version_is_read_as_wireshark_reads_it() -> None:
    blob = bytearray(cf.pcap_file([(1, 0, b"x", 1)]))
    for major, readable in ((3, True), (0x102, True), (1, False)):
        struct.pack_into("<H", blob, 4, major)
        reader, batches = read_all(bytes(blob))
        if readable:
            assert reader.finish() is None
            assert [decode(p)[2] for batch in batches for p in batch.packets] == [b"x"]
        else:
            assert isinstance(reader.error, CorruptCaptureError)
            assert reader.error.reason == ("pcap version 1.4 is not supported (only 2.x and "
                                           "later)")


# --- 7: singular and plural -------------------------------------------------------------------


def test_damage_sentences_agree_in_number(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "cut.pcapng"
    source.write_bytes(df.cut_after_one_packet())
    assert main(["merge", str(source), "-o", str(tmp_path / "o")]) == ExitCode.PARTIAL
    assert main(["inspect", str(source)]) == ExitCode.PARTIAL
    used, counted = messages(caplog, "ERROR")
    assert used.endswith("; the 1 packet before it was used.")
    assert counted.endswith("; the 1 packet before it is counted above.")
    caplog.clear()
    two = cf.shb() + cf.idb() + cf.epb(0, 1, b"a") + cf.epb(0, 2, b"b") + cf.epb(0, 3, b"c")
    source.write_bytes(two[:-3])
    assert main(["merge", str(source), "-o", str(tmp_path / "o")]) == ExitCode.PARTIAL
    assert main(["inspect", str(source)]) == ExitCode.PARTIAL
    used, counted = messages(caplog, "ERROR")
    assert used.endswith("; the 2 packets before it were used.")
    assert counted.endswith("; the 2 packets before it are counted above.")


def test_many_damaged_blocks_are_told_in_a_few_sentences_and_a_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "many.pcapng"
    source.write_bytes(cf.shb() + cf.idb() + cf.isb(3, 1) * 25 + cf.isb(3, 1) + cf.epb(0, 1, b""))
    assert main(["merge", str(source), "-o", str(tmp_path / "o")]) == ExitCode.PARTIAL
    warnings = messages(caplog, "WARNING")
    assert len(warnings) == 21
    assert warnings[-1] == (f"{source} has 6 more damaged blocks that reading went past in the "
                            "same way; they are not listed.")


# --- 6: memory per interface ------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["inspect", "--json"], ["inspect"], ["merge", "-o"]])
def test_memory_per_interface_stays_small(argv: list[str], tmp_path: Path) -> None:
    """mergecap needs about 600 bytes per interface (59 MB for 100,000 interfaces, 162 MB for
    300,000, peak RSS); Python's allocations here stay below 1,000 bytes per interface. Before,
    inspect --json held each interface's JSON at once, about 2 KB each."""
    import contextlib
    import os
    import tracemalloc

    peaks = []
    for count in (1_000, 3_000):
        source = tmp_path / f"{count}.pcapng"
        source.write_bytes(df.many_interfaces(count))
        args = [argv[0], str(source), *argv[1:]]
        if argv[0] == "merge":
            args.append(str(tmp_path / "out.pcapng"))
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            tracemalloc.start()
            try:
                assert main(args) == ExitCode.OK
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
    assert (peaks[1] - peaks[0]) / 2_000 < 1000
