"""The native piece's parsers (bench/native.py): strace, GNU time, `-X importtime`, openssl
and the unlock timelines, on outputs recorded on the host. No command runs here."""

from __future__ import annotations

import pytest
from bench.native import (
    TraceEvent,
    io_size_histogram,
    parse_cryptsetup_benchmark,
    parse_importtime,
    parse_openssl_speed,
    parse_strace_events,
    parse_strace_summary,
    parse_time_rss_kib,
    slowest_imports,
    spread,
    trace_timeline,
    trim_endpoints,
    trim_service_model,
    unlock_timeline,
)
from bench.native_report import _io_text

STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 24.86    0.000571          15        38           read
 13.63    0.000313           4        64        20 openat
  2.70    0.000062          20         3           mlock
  0.00    0.000000           0         1           prlimit64
------ ----------- ----------- --------- --------- ----------------
100.00    0.002297           6       356        28 total
"""


def test_strace_summary_rows_with_and_without_errors_and_no_total() -> None:
    rows = parse_strace_summary(STRACE_C)
    assert [(r.name, r.calls, r.errors) for r in rows] == [
        ("read", 38, 0),
        ("openat", 64, 20),
        ("mlock", 3, 0),
        ("prlimit64", 1, 0),
    ]
    assert rows[0].seconds == pytest.approx(0.000571)


def test_gnu_time_rss_is_the_last_line_even_after_an_exit_status_line() -> None:
    assert parse_time_rss_kib("45184\n") == 45184
    assert parse_time_rss_kib("Command exited with non-zero status 2\n10848\n") == 10848


def test_gnu_time_without_a_number_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no peak RSS"):
        parse_time_rss_kib("Command terminated by signal 9\n")


def test_importtime_self_time_grouped_by_package() -> None:
    text = """\
import time: self [us] | cumulative | imported package
import time:       850 |       4756 |       tomllib._parser
import time:     18261 |      37573 |   encryptrootfs.config
import time:      2000 |       9000 |     botocore.session
import time:      1000 |       1000 |       botocore.utils
import time:       500 |        500 | urllib3
not an import line
"""
    got = parse_importtime(text)
    assert got["encryptrootfs"] == pytest.approx(0.018261)
    assert got["botocore"] == pytest.approx(0.003)
    assert got["urllib3"] == pytest.approx(0.0005)
    assert got["stdlib and others"] == pytest.approx(0.00085)
    assert got["total"] == pytest.approx(0.018261 + 0.003 + 0.0005 + 0.00085)


def test_openssl_speed_last_column_in_mib_per_second() -> None:
    text = (
        "The 'numbers' are in 1000s of bytes per second processed.\n"
        "type          65536 bytes\n"
        "AES-256-XTS    6716074.67k\n"
    )
    assert parse_openssl_speed(text) == pytest.approx(6716074.67 * 1000 / 1048576)
    assert parse_openssl_speed("no numbers here\n") is None


def test_cryptsetup_benchmark_line_and_its_absence() -> None:
    text = "#     Algorithm |       Key |      Encryption |      Decryption\n"
    text += "        aes-xts        512b      2210.5 MiB/s      2250.1 MiB/s\n"
    assert parse_cryptsetup_benchmark(text) == {
        "key_bits": 512.0,
        "encrypt": 2210.5,
        "decrypt": 2250.1,
    }
    assert parse_cryptsetup_benchmark("Required kernel crypto interface not available.\n") is None


def test_io_histogram_counts_data_sizes_and_syncs_but_not_small_reads() -> None:
    text = """\
4242  read(0, ..., 4096) = 64
4242  pread64(5, ..., 1048576, 0) = 1048576
4242  read(5, ..., 16777216) = 16777216
4242  read(5, ..., 16777216) = 16777216
4242  write(5, ..., 16777216) = 16777216
4242  fsync(5) = 0
4242  fdatasync(5) = 0
"""
    got = io_size_histogram(text)
    assert got == {
        "pread64": {"1048576": 1},
        "read": {"16777216": 2},
        "write": {"16777216": 1},
        "fsync": {"0": 1},
        "fdatasync": {"0": 1},
    }
    assert _io_text(got) == "read 16 MiB x2; pread64 1 MiB x1; write 16 MiB x1; 2 syncs"


def test_io_histogram_counts_the_image_opens_and_which_bypass_the_cache() -> None:
    text = """\
12305 openat(AT_FDCWD, "/w/v.img", O_RDONLY|O_DIRECT) = 3
12305 openat(AT_FDCWD, "/w/v.img", O_RDWR|O_NONBLOCK|O_CLOEXEC) = 6
12305 openat(AT_FDCWD, "/w/v.img", O_RDONLY|O_DIRECT) = -1 EINVAL (Invalid argument)
12305 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3
"""
    got = io_size_histogram(text, "/w/v.img")
    assert got == {"opens": {"all": 2, "O_DIRECT": 1}}
    assert _io_text(got).endswith("the image opened 2 times, 1 with O_DIRECT")


def test_spread_median_and_range() -> None:
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError):
        spread([])


def test_unlock_timeline_from_the_emulators_logs() -> None:
    t = unlock_timeline(100.0, 100.5, [100.20, 100.21, 100.23], [100.35])
    assert t == pytest.approx(
        {
            "before_imds_s": 0.20,
            "imds_s": 0.03,
            "client_and_kms_s": 0.12,
            "keyslot_and_exit_s": 0.15,
            "total_s": 0.5,
        }
    )
    with pytest.raises(ValueError):
        unlock_timeline(0.0, 1.0, [], [0.5])


VERIFY_TRACE = """\
700 1000.000000 execve("/venv/bin/python3", ["/venv/bin/python3", "/venv/bin/encryptrootfs", \
"--config", "/w/config.toml", "token", "verify", "/w/unlock.img"], 0x7ffe /* 30 vars */) = 0
701 1000.300000 execve("/usr/sbin/cryptsetup", ["/usr/sbin/cryptsetup", "luksDump", \
"--dump-json-metadata", "/w/unlock.img"], 0x55 /* 32 vars */) = 0
701 1000.310000 +++ exited with 0 +++
700 1000.310100 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=701} ---
702 1000.312000 execve("/usr/sbin/cryptsetup", ["/usr/sbin/cryptsetup", "luksDump", \
"/w/unlock.img"], 0x55 /* 32 vars */) = 0
702 1000.320000 +++ exited with 0 +++
700 1000.500000 connect(4, {sa_family=AF_INET, sin_port=htons(40001), \
sin_addr=inet_addr("127.0.0.1")}, 16) = 0
700 1000.510000 connect(4, {sa_family=AF_INET, sin_port=htons(40001), \
sin_addr=inet_addr("127.0.0.1")}, 16) = 0
700 1000.600000 connect(5, {sa_family=AF_INET, sin_port=htons(40002), \
sin_addr=inet_addr("127.0.0.1")}, 16) = 0
703 1000.650000 execve("/usr/sbin/cryptsetup", ["/usr/sbin/cryptsetup", "open", \
"--test-passphrase", "--key-file", "-", "--key-slot", "1", "/w/unlock.img"], 0x55) = 0
703 1000.670000 +++ exited with 0 +++
700 1000.700000 +++ exited with 0 +++
"""


def test_strace_events_and_the_verify_timeline() -> None:
    events = parse_strace_events(VERIFY_TRACE)
    assert [e.kind for e in events] == [
        "exec",
        "exec",
        "exit",
        "exec",
        "exit",
        "connect",
        "connect",
        "connect",
        "exec",
        "exit",
        "exit",
    ]
    assert events[5] == TraceEvent(700, 1000.5, "connect", "40001")
    assert "--test-passphrase" in events[8].detail
    t = trace_timeline(events, imds_port=40001, kms_port=40002)
    assert t == pytest.approx(
        {
            "to_first_command_s": 0.3,
            "header_reads_s": 0.02,
            "to_imds_s": 0.18,
            "imds_to_kms_s": 0.1,
            "kms_to_keyslot_s": 0.05,
            "keyslot_s": 0.02,
            "exit_s": 0.03,
            "total_s": 0.7,
            "commands_before_imds": 2.0,
        }
    )


def test_a_failed_exec_is_not_an_event() -> None:
    line = (
        '9 1.0 execve("/root/.cargo/bin/bash", ["bash", "x"], 0x7f /* 3 vars */) '
        "= -1 ENOENT (No such file or directory)\n"
    )
    assert parse_strace_events(line) == []


def test_a_trace_without_kms_has_no_timeline() -> None:
    events = parse_strace_events(VERIFY_TRACE.replace("htons(40002)", "htons(9)"))
    with pytest.raises(ValueError, match="no IMDS or no KMS"):
        trace_timeline(events, imds_port=40001, kms_port=40002)


def test_slowest_imports_by_self_time() -> None:
    text = (
        "import time:       850 |       4756 |       tomllib._parser\n"
        "import time:     18261 |      37573 |   encryptrootfs.config\n"
        "import time:      2000 |       9000 |     botocore.session\n"
    )
    assert slowest_imports(text, 2) == [
        ("encryptrootfs.config", 0.018261),
        ("botocore.session", 0.002),
    ]


def test_trimmed_service_model_keeps_the_operations_and_the_shapes_they_reach() -> None:
    model = {
        "metadata": {"apiVersion": "2014-11-01"},
        "operations": {
            "Decrypt": {
                "input": {"shape": "DecryptRequest"},
                "output": {"shape": "DecryptResponse"},
                "errors": [{"shape": "NotFoundException"}],
            },
            "ListKeys": {"input": {"shape": "ListKeysRequest"}},
        },
        "shapes": {
            "DecryptRequest": {"type": "structure", "members": {"Ctx": {"shape": "Context"}}},
            "Context": {"type": "map", "key": {"shape": "Str"}, "value": {"shape": "Str"}},
            "Str": {"type": "string"},
            "DecryptResponse": {"type": "structure", "members": {"Ids": {"shape": "IdList"}}},
            "IdList": {"type": "list", "member": {"shape": "Str"}},
            "NotFoundException": {"type": "structure", "members": {}},
            "ListKeysRequest": {"type": "structure", "members": {"L": {"shape": "Limit"}}},
            "Limit": {"type": "integer"},
        },
    }
    got = trim_service_model(model, ["Decrypt"])
    assert list(got["operations"]) == ["Decrypt"]
    assert set(got["shapes"]) == {
        "DecryptRequest",
        "Context",
        "Str",
        "DecryptResponse",
        "IdList",
        "NotFoundException",
    }
    assert got["metadata"] == model["metadata"]


def test_trimmed_endpoints_keep_every_partition_with_kms_only() -> None:
    data = {
        "version": 3,
        "partitions": [
            {"partition": "aws", "services": {"kms": {"a": 1}, "s3": {}}},
            {"partition": "aws-cn", "services": {"ec2": {}}},
        ],
    }
    got = trim_endpoints(data)
    assert got["version"] == 3
    assert [p["services"] for p in got["partitions"]] == [{"kms": {"a": 1}}, {}]
