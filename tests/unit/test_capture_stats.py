from __future__ import annotations

from multisniff.capture.stats import TcpdumpStatistics, last_lines, parse_statistics

TCPDUMP_END = (
    "tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), snapshot length 262144 "
    "bytes\n12 packets captured\n15 packets received by filter\n0 packets dropped by kernel\n"
)


def test_all_three_counts_are_read() -> None:
    assert parse_statistics(TCPDUMP_END) == TcpdumpStatistics(12, 15, 0)


def test_singular_and_missing_counts() -> None:
    assert parse_statistics("1 packet captured\n") == TcpdumpStatistics(captured=1)
    assert parse_statistics("tcpdump: any: No such device exists\n") == TcpdumpStatistics()


def test_the_last_run_wins_and_other_lines_are_ignored() -> None:
    text = TCPDUMP_END + "3 packets captured\n4 packets received by filter\n" \
        "7 packets dropped by interface\n"
    assert parse_statistics(text) == TcpdumpStatistics(3, 4, 0)


def test_last_lines_leave_the_statistics_out() -> None:
    text = "tcpdump: syntax error in filter expression\n" + TCPDUMP_END
    assert last_lines(text, count=2).splitlines() == [
        "tcpdump: syntax error in filter expression",
        "tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), snapshot length "
        "262144 bytes",
    ]
