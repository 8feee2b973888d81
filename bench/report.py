"""bench/RESULTS.md and the figures, regenerated from results.json (never edited by hand)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Optional

from . import native_report
from .common import BENCH, MIB

RESULTS_MD = BENCH / "RESULTS.md"


@dataclass(frozen=True)
class Verdict:
    measure: str
    target: str
    value: str
    met: Optional[bool]  # None: not measured
    note: str


def _fmt(v: Optional[float], unit: str = "", digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def _pieces(results: dict[str, Any]) -> dict[str, Any]:
    pieces: dict[str, Any] = results.get("pieces", {})
    return pieces


# -- the six measures ---------------------------------------------------------------------------


def throughput_rows(disk: dict[str, Any]) -> list[dict[str, float]]:
    rows = []
    for item in disk.get("throughput", []):
        raw = mean(r["mib_s"] for r in item["raw"])
        rows.append(
            {
                "size_mib": item["size_mib"],
                "raw_mib_s": raw,
                "raw_spread": abs(item["raw"][0]["mib_s"] - item["raw"][1]["mib_s"]),
                "product_mib_s": item["product"]["mib_s"],
                "ratio": item["product"]["mib_s"] / raw,
            }
        )
    return rows


def variant_rows(disk: dict[str, Any]) -> list[dict[str, Any]]:
    """The data pass's variants (bench/guest/disk_bench.py VARIANTS), one row each."""
    rows = []
    for v in disk.get("variants", []):
        busy = (
            (v.get("user_s", 0.0) + v.get("sys_s", 0.0)) / v["seconds"]
            if v.get("seconds")
            else None
        )
        rows.append(
            {
                "name": v["name"],
                "ok": bool(v.get("ok")),
                "stage": v.get("stage"),
                "mib_s": v.get("mib_s") if v.get("ok") else None,
                "user_share": v["user_s"] / v["seconds"] if v.get("ok") else None,
                "busy": busy if v.get("ok") else None,
                "ios": v.get("ios"),
                "read_mib": v.get("read_mib"),
                "write_mib": v.get("write_mib"),
                "resilience": v.get("resilience"),
                "mib": v.get("mib"),
                "user_s": v.get("user_s"),
                "err": (v.get("err") or "").strip().splitlines()[-1:] or [""],
            }
        )
    return rows


def throughput_reason(disk: dict[str, Any]) -> Optional[str]:
    """Why the data pass runs at the rate it does, from the variants and the engine's limits
    measured side by side on one disk; None when this run did not measure them."""
    rows = {r["name"]: r for r in variant_rows(disk)}
    engines = disk.get("engine", [])
    product = [
        r for n, r in rows.items() if n.startswith("product") and "OpenSSL" not in n and r["ok"]
    ]
    if not product or not engines:
        return None

    def avg(values: list[Optional[float]]) -> Optional[float]:
        kept = [v for v in values if v is not None]
        return mean(kept) if kept else None

    rate = avg([r["mib_s"] for r in product])
    user = avg([r["user_share"] for r in product])
    write = avg([e["write"]["mib_s"] for e in engines])
    read = avg([e["read"]["mib_s"] for e in engines])
    inplace = avg([e["inplace"]["mib_s"] for e in engines])
    ossl = avg([e.get("openssl_xts_mib_s") for e in engines])
    ossl_plain = avg([e.get("openssl_xts_no_aesni_mib_s") for e in engines])
    kernel = avg([(e.get("cryptsetup_benchmark_mib_s") or {}).get("encrypt") for e in engines])
    p0 = product[0]
    text = (
        f"Why, measured on one {disk.get('variants_disk_mib', '')} MiB disk in the same "
        f"guest: the data pass ran at {_fmt(rate, ' MiB/s', 1)} with cryptsetup busy in user "
        f"space {_fmt(100 * user if user else None, '%', 0)} of the time: it is CPU-bound "
        "in cryptsetup's own process, which encrypts with OpenSSL (libcrypto) on one vCPU, "
        "while dm-crypt encrypts in the kernel, spread over both vCPUs. Its I/O is "
        f"sequential and not amplified ({p0['read_mib']:.0f} MiB read, "
        f"{p0['write_mib']:.0f} MiB written, {p0['ios']} requests for "
        f"{p0['mib'] or 0:.0f} MiB). Engine limits in the same guest: "
        f"dm-crypt write {_fmt(write, '', 1)}, read {_fmt(read, '', 1)}, in-place read + "
        f"write {_fmt(inplace, '', 1)} MiB/s; `cryptsetup benchmark` (cipher only, no "
        f"disk) {_fmt(kernel, '', 1)} MiB/s; OpenSSL AES-256-XTS on one vCPU "
        f"{_fmt(ossl, '', 1)} MiB/s ({_fmt(ossl_plain, '', 1)} with AES-NI off)"
    )
    if ossl and rate:
        text += (
            f", so the data pass reaches {rate / ossl:.2f} of its own cipher's speed and "
            f"{rate / inplace:.2f} of dm-crypt's in-place copy"
            if inplace
            else ""
        )
    cpu_ms = avg([1000 * r["user_s"] / r["mib"] for r in product if r.get("mib")])
    if cpu_ms and ossl:
        text += (
            f". cryptsetup spends {cpu_ms:.0f} ms of user CPU per MiB where OpenSSL's "
            f"own XTS benchmark needs {1000 / ossl:.0f} ms ({cpu_ms * ossl / 1000:.1f}x)"
        )
    no_aes = next((r for n, r in rows.items() if "without AES-NI" in n and r["ok"]), None)
    if no_aes and rate and no_aes["mib_s"] and ossl and ossl_plain:
        text += (
            f"; with OpenSSL's AES-NI switched off the pass slows "
            f"{rate / no_aes['mib_s']:.1f}x ({_fmt(no_aes['mib_s'], ' MiB/s', 2)}) "
            "as OpenSSL's XTS slows "
            f"{ossl / ossl_plain:.1f}x: the pass's time follows the cipher's, it is bound by "
            "cryptsetup's cipher calls (not by the disk, the header updates or the syncs)"
        )
    text += ". Variants: "
    parts = []
    for name, r in rows.items():
        if name.startswith("product"):
            continue
        if r["ok"]:
            used = (
                f", the header says {r['resilience']}"
                if name.startswith("resilience") and r["resilience"]
                else ""
            )
            parts.append(
                f"{name} {_fmt(r['mib_s'], ' MiB/s', 1)} ({r['ios']} requests, "
                f"user {_fmt(100 * r['user_share'], '%', 0)}{used})"
            )
        else:
            parts.append(f"{name}: refused by cryptsetup at {r['stage']} ({r['err'][0]})")
    text += "; ".join(parts) + ". "
    hot = [r for n, r in rows.items() if n.startswith("hotzone") and r["ok"]]
    if hot and all(abs(r["ios"] - p0["ios"]) <= 0.05 * p0["ios"] for r in hot):
        text += (
            f"--hotzone-size is ignored: {', '.join(str(r['ios']) for r in hot)} requests "
            f"against the product's {p0['ios']} (within 5%), since in an encryption with "
            "data shift the hotzone is the shift (32 MiB). "
        )
    online = [r for n, r in rows.items() if n.startswith("online") and r["ok"]]
    if online:
        text += (
            f"Online, cryptsetup still runs the cipher in its own process (user "
            f"{_fmt(100 * (online[0]['user_share'] or 0), '%', 0)}). "
        )
    faster = [
        n
        for n, r in rows.items()
        if r["ok"]
        and rate
        and r["mib_s"]
        and r["mib_s"] > 1.25 * rate
        and not n.startswith("product")
    ]
    if faster:
        rates = [r["mib_s"] for r in product if r["mib_s"]]
        text += (
            f"Faster than the product's mean by more than 25%: {', '.join(faster)}"
            f" (the product's own passes: "
            f"{', '.join(f'{x:.1f}' for x in rates)} MiB/s)"
        )
        if all(abs(rows[n]["ios"] - p0["ios"]) <= 0.05 * p0["ios"] for n in faster):
            text += (
                ", with the same I/O and the same CPU-bound share as the product: the "
                "shared host's noise, not a faster mode"
            )
        text += ". "
    else:
        text += (
            "No variant is faster than the product by more than 25% (the noise of this "
            "shared host). "
        )
    text += (
        "The ratio to dm-crypt is the single-thread user-space cipher against the "
        "kernel's threads, here with AES emulated by TCG; with hardware AES-NI, OpenSSL's "
        "XTS is much faster than a disk (not measured here)."
    )
    return text


def memory_rows(disk: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for item in disk.get("throughput", []) + disk.get("memory", []):
        p = item["product"]
        rows.append(
            {
                "size_mib": item["size_mib"],
                "data_mib": item.get("data_mib"),
                "cgroup_peak_mib": p["cgroup_peak_mib"],
                "peak_rss_mib": p["peak_rss_mib"],
                "anon_peak_mib": p["sampled_anon_peak_mib"],
                "fsck_rc": p.get("fsck_rc"),
            }
        )
    return sorted(rows, key=lambda r: r["size_mib"])


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    pieces = _pieces(results)
    out = []
    disk = pieces.get("disk")
    rows = throughput_rows(disk) if disk else []
    if rows:
        worst = min(rows, key=lambda r: r["ratio"])
        value = ", ".join(
            f"{r['size_mib']} MiB: {r['product_mib_s']:.1f} / {r['raw_mib_s']:.1f}"
            f" MiB/s = {r['ratio']:.2f}"
            for r in rows
        )
        met = worst["ratio"] >= 0.8
        note = (
            ""
            if met
            else (
                f"missed: {worst['ratio']:.2f} at the worst size, {0.8 - worst['ratio']:.2f} below "
                "the target. The data pass's rate hardly changes with the size, "
                "so it is its steady state, not a start-up cost. "
            )
        )
        reason = throughput_reason(disk) if disk else None
        note += reason or ("Why is not isolated by this run (no variants measured).")
        first = _first_boot_line(_pieces(results).get("boot"))
        if first:
            note += f" The real first boot of the product image (512 MiB guest) said: {first}"
        out.append(
            Verdict(
                "1. encryption throughput (data pass / raw dm-crypt write)",
                "ratio >= 0.8",
                value,
                met,
                note,
            )
        )
    else:
        out.append(Verdict("1. encryption throughput", "ratio >= 0.8", "not measured", None, ""))
    mem = memory_rows(disk) if disk else []
    if disk and mem:
        peaks = [r["cgroup_peak_mib"] for r in mem]
        spread = max(peaks) - min(peaks)
        flat = spread <= 0.1 * max(peaks)
        met = flat and max(peaks) <= 200
        value = ", ".join(
            f"{r['size_mib']} MiB: {r['cgroup_peak_mib']:.0f} MiB (RSS {r['peak_rss_mib']:.0f})"
            for r in mem
        )
        note = (
            f"spread {spread:.1f} MiB across sizes ({'flat' if flat else 'not flat'}: "
            "within 10% of the largest counts as flat)"
        )
        with_fs = [r for r in mem if r["data_mib"]]
        if not flat and with_fs:
            note += (
                f"; only the {with_fs[0]['size_mib']} MiB disk holds a filesystem with data "
                "(the others are zero-filled), and its cryptsetup peak RSS is the "
                "difference: the step more likely follows the content than the size"
            )
        checked = [r for r in mem if r["fsck_rc"] is not None]
        for r in checked:
            note += (
                f"; after the pass, `e2fsck -fn` of the {r['data_mib']} MiB of data through "
                f"the new mapping: exit {r['fsck_rc']}"
                f"{' (clean)' if r['fsck_rc'] == 0 else ' (NOT clean)'}"
            )
        base = disk.get("baseline_2016", [])
        if base:
            b = base[0]
            if b.get("result") == "ok":
                how = f"finished (rc {b['rc']})"
            elif b.get("failed_step"):
                how = f"failed at step {b['failed_step']} after copying {b.get('copied_mib')} MiB"
            else:  # the OOM killer took the script itself: no line after the last step
                how = f"was killed (rc {b['rc']}) during step {b.get('step', '?')}"
            note += (
                f"; the 2016 baseline (copy to tmpfs, luksFormat, copy back) with "
                f"{b.get('du_mib', '?')} MiB of data {how}: {b['oom_kills']} OOM kills in "
                f"its cgroup, capped at {b['cap_mib']} MiB (the guest's available "
                f"{b['mem_available_mib']:.0f} MiB minus 64, so that the guest survives), "
                f"peak {b['cgroup_peak_mib']:.0f} MiB. It needs at least the data's size in "
                "RAM, while the data pass stayed under 75 MiB at every size"
            )
        out.append(
            Verdict(
                "2. memory of the first boot's data pass (cgroup peak)",
                "flat in root size and <= 200 MiB",
                value,
                met,
                note,
            )
        )
    else:
        out.append(Verdict("2. memory", "flat, <= 200 MiB", "not measured", None, ""))
    boot = pieces.get("boot")
    s = boot["summary"] if boot else None
    if boot and s and s.get("ratio_unit_to_argon2") is not None:
        sp = s["split"]
        value = (
            f"unit {s['unit']['unit_s']:.2f} s vs Argon2id open {s['argon2_open_s']:.2f} s "
            f"= {s['ratio_unit_to_argon2']:.2f}; keyslot open alone "
            f"{s['token_keyslot_open_s']:.2f} s = {s['ratio_open_to_argon2']:.2f}"
        )
        met = s["ratio_unit_to_argon2"] <= 0.2
        note = (
            f"split: Python start {_fmt(sp['python_start_s'], ' s')}, imports "
            f"{_fmt(sp['imports_s'], ' s')}, IMDS {_fmt(sp['imds_s'], ' s')}, KMS client "
            f"{_fmt(sp['kms_client_s'], ' s')}, KMS Decrypt {_fmt(sp['kms_decrypt_s'], ' s')},"
            f" cryptsetup open {_fmt(sp['cryptsetup_open_s'], ' s')}; network wait in the "
            f"unit {_fmt(s['unit']['network_wait_s'], ' s')}. From the journal: unit start "
            f"to Python's first line {_fmt(s['unit']['start_to_python_s'], ' s')}, then to "
            f"the key unwrapped {_fmt(s['unit']['python_to_unwrapped_s'], ' s')}, then to "
            f"the mapping {_fmt(s['unit']['open_s'], ' s')}. Argon2id as cryptsetup's "
            "benchmark chose it in each guest: "
            + "; ".join(
                f"{g['unlock-open']['argon2_kdf'].get('memory', 0) // 1024} MiB, "
                f"{g['unlock-open']['argon2_kdf'].get('time')} iterations"
                for g in boot["guest_unlock"]
                if "unlock-open" in g
            )
            + "."
        )
        bf = s.get("before_first_line") or {}
        if bf.get("process_s") is not None:
            note += (
                f" Before the first line, the same steps re-run in the real root (same "
                f"interpreter and flags) take {_fmt(bf['process_s'], ' s')}: imports of "
                f"the CLI {_fmt(bf.get('import_cli_s'), ' s')} and of the boot package "
                f"{_fmt(bf.get('import_boot_s'), ' s')} (botocore is not imported yet; "
                f"encryptrootfs's own modules are {_fmt(bf.get('imports_ours_s'), ' s')} "
                f"of the {_fmt(bf.get('imports_all_s'), ' s')} of self time in the "
                "`-X importtime` trace, the rest the stdlib), "
                f"config {_fmt(bf.get('load_config_s'), ' s')}, `udevadm settle` "
                f"{_fmt(bf.get('udev_settle_idle_s'), ' s')} (idle there), finding the "
                f"root {_fmt(bf.get('locate_root_s'), ' s')} (blkid and the LUKS2 header "
                f"through cryptsetup), deciding {_fmt(bf.get('decide_s'), ' s')}, the rest "
                "being the interpreter's start; the other "
                f"{_fmt(bf.get('unexplained_at_boot_s'), ' s')} at boot is the initrd: "
                "`udevadm settle` waiting for udev's coldplug queue and the CPU shared "
                "with the units starting alongside on 2 emulated vCPUs."
            )
        if not met:
            cloud = sum(v or 0.0 for v in (sp["imds_s"], sp["kms_client_s"], sp["kms_decrypt_s"]))
            note += (
                f" Missed by {s['ratio_unit_to_argon2'] - 0.2:.2f}: the keyslot is cheap "
                "(PBKDF2, 1000 iterations) and IMDS + KMS client + Decrypt take "
                f"{cloud:.2f} s; the rest is Python's start and imports (botocore, "
                "urllib3 and the stdlib, CPU-bound under TCG), the wait before the first "
                "line, and `cryptsetup open` itself (dm table, udev)."
            )
        out.append(
            Verdict(
                "3. unlock cost (unit start to /dev/mapper ready, vs Argon2id open)",
                "ratio <= 0.2",
                value,
                met,
                note,
            )
        )
        over = s.get("overhead_without_network_s")
        value = (
            f"plain {_fmt(s['plain']['total'], ' s')} vs encrypted "
            f"{_fmt(s['encrypted']['total'], ' s')} (kernel+initrd+userspace): "
            f"{_fmt(s['overhead_s'], ' s', 1)}, {_fmt(over, ' s', 1)} without the network"
        )
        met4 = over is not None and over <= 3.0
        note = (
            f"initrd {_fmt(s['plain']['initrd'], ' s')} -> "
            f"{_fmt(s['encrypted']['initrd'], ' s')}, userspace "
            f"{_fmt(s['plain']['userspace'], ' s')} -> "
            f"{_fmt(s['encrypted']['userspace'], ' s')}; each boot's total: plain "
            f"{[round(b['startup'].get('total', 0), 1) for b in boot['plain_boots']]}, "
            f"encrypted {[round(b['startup'].get('total', 0), 1) for b in boot['later_boots']]}"
            " s (boots alternate; the spread is the shared host's noise)."
        )
        totals = [b["startup"].get("total", 0.0) for b in boot["plain_boots"] + boot["later_boots"]]
        noise = max(totals) - min(totals) if totals else 0.0
        if met4 and noise > 3.0:
            note += (
                f" Met, but inside this run's noise: boots of one image differ by up to "
                f"{noise:.1f} s, more than the target; the initrd phase alone (where the "
                f"unit runs) grew by {s['encrypted']['initrd'] - s['plain']['initrd']:.1f} s "
                "and is the more telling number."
            )
        if not met4 and over is not None:
            note += (
                f" Missed by {over - 3.0:.1f} s: the unit's own time (Python, botocore, "
                "IMDS, KMS, open) is on the critical path before the root can be mounted."
            )
        out.append(
            Verdict(
                "4. boot overhead of a later boot (systemd-analyze)",
                "<= +3 s under TCG, network excluded",
                value,
                met4,
                note,
            )
        )
    else:
        out.append(Verdict("3. unlock cost", "ratio <= 0.2", "not measured", None, ""))
        out.append(Verdict("4. boot overhead", "<= +3 s", "not measured", None, ""))
    ini = pieces.get("initramfs")
    if ini:
        growth = ini["growth_compressed_mib"]
        biggest = sorted(ini["growth_by_component"].items(), key=lambda kv: -kv[1]["unpacked"])
        value = (
            f"{ini['plain']['compressed'] / MIB:.1f} -> "
            f"{ini['product']['compressed'] / MIB:.1f} MiB compressed "
            f"(+{growth:.2f} MiB, {ini['product']['compression']}), "
            f"{ini['plain']['unpacked'] / MIB:.1f} -> {ini['product']['unpacked'] / MIB:.1f}"
            f" MiB unpacked (+{ini['growth_unpacked_mib']:.2f} MiB)"
        )
        note = "growth by component (unpacked / compressed alone): " + ", ".join(
            f"{n} +{d['unpacked'] / MIB:.2f} / +{d['compressed_estimate'] / MIB:.2f} MiB"
            for n, d in biggest
            if d["unpacked"]
        )
        out.append(
            Verdict(
                "5. initramfs growth from the module",
                "<= 8 MiB compressed",
                value,
                growth <= 8.0,
                note,
            )
        )
    else:
        out.append(Verdict("5. initramfs", "<= 8 MiB", "not measured", None, ""))
    fleet = pieces.get("fleet")
    if fleet:
        met = fleet["failures"] == 0 and fleet["ratio_to_ideal"] <= 1.5
        value = (
            f"{fleet['machines']} machines at {fleet['rate_per_s']:g}/s (burst "
            f"{fleet['burst']}): {fleet['failures']} failures, all done in "
            f"{fleet['completion_s']:.1f} s vs ideal {fleet['ideal_s']:.1f} s = "
            f"{fleet['ratio_to_ideal']:.2f}x; median {_fmt(fleet['median_s'], ' s', 1)}, "
            f"p95 {_fmt(fleet['p95_s'], ' s', 1)}"
        )

        def dist(d: dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: int(kv[0])))

        note = (
            f"{fleet['requests_total']} Decrypt requests, {fleet['throttled_total']} "
            f"throttled; machines by Decrypt requests made (1 = no retry) "
            f"{{{dist(fleet['requests_per_machine'])}}}; by the boot's retry rounds "
            f"{{{dist(fleet['rounds_per_machine'])}}}"
        )
        if not met:
            note += (
                ". Missed: botocore's standard retry mode backs off with full jitter "
                "(up to 2^n s) and the boot's own rounds add 1, 2, 4 ... s; once the "
                "bucket is drained, machines sleep through seconds in which KMS would "
                "have granted requests, so the tail is set by backoff, not by the rate."
            )
        out.append(
            Verdict(
                "6. fleet: concurrent unlocks against a throttled KMS",
                "0 failures and <= 1.5x ideal",
                value,
                met,
                note,
            )
        )
    else:
        out.append(Verdict("6. fleet", "0 failures, <= 1.5x ideal", "not measured", None, ""))
    return out


def _first_boot_line(boot: Optional[dict[str, Any]]) -> Optional[str]:
    lines: list[str] = (boot or {}).get("first_boot", {}).get("lines", [])
    for line in lines:
        if "encryption finished" in line:
            return "`" + line.replace("encryptrootfs: ", "") + "`."
    return None


# -- output ------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    pieces = _pieces(results)
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `make bench` (bench/report.py) from `bench/results.json`; do not edit.",
        "Targets from issue 8 are reported here, never asserted by tests. All guests: Debian "
        "bookworm under QEMU TCG, 2 vCPUs, 512 MiB RAM, on a 2-core host shared with other "
        "work; compare numbers within one run (side by side), not across machines. The "
        "native section (issue 19) measures the same product on the host's own CPU.",
        "",
    ]
    small = [n for n, p in pieces.items() if p.get("small")]
    if small:
        lines += [f"**Small development sizes** for: {', '.join(small)} (not the issue's).", ""]
    lines += ["| measure | target | measured | met |", "|---|---|---|---|"]
    notes = []
    for v in verdicts(results):
        met = {True: "yes", False: "**no**", None: "-"}[v.met]
        lines.append(f"| {v.measure} | {v.target} | {v.value} | {met} |")
        if v.note:
            notes.append(f"- **{v.measure.split(' ')[0]}** {v.note}")
    lines += ["", "## Notes", "", *notes, ""]
    lines += native_report.section(pieces)
    lines += [f"![{name}]({name}.png)" for name in FIGURES if (BENCH / f"{name}.png").exists()]
    when = {n: p.get("measured_at") for n, p in pieces.items()}
    lines += ["", "Measured at (UTC): " + ", ".join(f"{n} {t}" for n, t in sorted(when.items()))]
    return "\n".join(lines) + "\n"


FIGURES = ("throughput", "memory", "unlock", "boot", "initramfs", "fleet", "native")


def _plots(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces = _pieces(results)
    disk, boot, ini, fleet = (pieces.get(k) for k in ("disk", "boot", "initramfs", "fleet"))

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(BENCH / f"{name}.png", dpi=90)
        plt.close(fig)

    if disk and disk.get("throughput"):
        rows = throughput_rows(disk)
        variants = [r for r in variant_rows(disk) if r["ok"]]
        engines = disk.get("engine", [])
        if variants and engines:
            fig, (ax, ax2) = plt.subplots(
                1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.6]}
            )
        else:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax2 = None
        xs = range(len(rows))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["raw_mib_s"] for r in rows],
            0.4,
            label="raw dm-crypt write (mean of 2)",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r["product_mib_s"] for r in rows],
            0.4,
            label="first-boot data pass",
        )
        ax.set_xticks(list(xs), [f"{r['size_mib']} MiB" for r in rows])
        ax.set_ylabel("MiB/s")
        ax.set_title("1. Encryption throughput (same guest, same boot)")
        ax.legend(loc="center right", fontsize=8)
        if ax2 is not None:

            def avg(get: Any) -> float:
                kept = [v for v in (get(e) for e in engines) if v is not None]
                return mean(kept) if kept else 0.0

            limits = [
                ("dm-crypt write", avg(lambda e: e["write"]["mib_s"])),
                ("dm-crypt read", avg(lambda e: e["read"]["mib_s"])),
                ("dm-crypt in-place\nread+write", avg(lambda e: e["inplace"]["mib_s"])),
                (
                    "cryptsetup benchmark\n(cipher only)",
                    avg(lambda e: (e.get("cryptsetup_benchmark_mib_s") or {}).get("encrypt")),
                ),
                ("OpenSSL XTS\n(1 thread)", avg(lambda e: e.get("openssl_xts_mib_s"))),
            ]
            names = [n for n, _ in limits] + [r["name"].replace(" (", "\n(") for r in variants]
            values = [v for _, v in limits] + [r["mib_s"] or 0.0 for r in variants]
            colors = ["tab:blue"] * len(limits) + ["tab:orange"] * len(variants)
            ax2.barh(range(len(names)), values, color=colors)
            for i, r in enumerate(variants):
                ax2.text(
                    values[len(limits) + i],
                    len(limits) + i,
                    f" user CPU {100 * (r['user_share'] or 0):.0f}%",
                    va="center",
                    fontsize=7,
                )
            ax2.set_yticks(range(len(names)), names, fontsize=7)
            ax2.invert_yaxis()
            ax2.set_xlabel("MiB/s")
            ax2.set_title(
                f"Why: engine limits (blue) and data-pass variants (orange), one "
                f"{disk.get('variants_disk_mib', '?')} MiB disk",
                fontsize=9,
            )
        save(fig, "throughput")
        mem = memory_rows(disk)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sizes = [r["size_mib"] for r in mem]
        ax.plot(sizes, [r["cgroup_peak_mib"] for r in mem], "o-", label="data pass, cgroup peak")
        ax.plot(sizes, [r["peak_rss_mib"] for r in mem], "s-", label="data pass, peak RSS")
        for b in disk.get("baseline_2016", []):
            ax.plot(
                [b["size_mib"]],
                [b["cgroup_peak_mib"]],
                "rx",
                markersize=10,
                label=f"2016 baseline: {b.get('result') or 'killed (OOM)'}, cap {b['cap_mib']} MiB",
            )
            ax.axhline(
                b["data_mib"],
                color="r",
                linestyle=":",
                label=f"2016 baseline needs >= data ({b['data_mib']} MiB)",
            )
        ax.axhline(200, color="g", linestyle="--", label="target 200 MiB")
        ax.set_xlabel("root (disk) size, MiB")
        ax.set_ylabel("MiB")
        ax.set_title("2. Peak memory vs root size (512 MiB guest)")
        ax.legend(fontsize=7)
        save(fig, "memory")
    if boot:
        s = boot["summary"]
        sp = s["split"]
        parts = [
            ("Python start", sp["python_start_s"]),
            ("imports", sp["imports_s"]),
            ("IMDS", sp["imds_s"]),
            ("KMS client", sp["kms_client_s"]),
            ("KMS Decrypt", sp["kms_decrypt_s"]),
            ("cryptsetup open", sp["cryptsetup_open_s"]),
        ]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        left = 0.0
        for label, v in parts:
            if v is not None:
                ax.barh(["encryptrootfs unlock"], [v], left=left, label=label)
                left += v
        if s["unit"]["unit_s"] is not None:
            ax.barh(["unit (journal)"], [s["unit"]["unit_s"]], color="grey")
        if s["argon2_open_s"] is not None:
            ax.barh(["Argon2id open"], [s["argon2_open_s"]], color="black")
        ax.set_xlabel("seconds")
        ax.set_title("3. Unlock cost, split (later boot)")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        save(fig, "unlock")
        fig, ax = plt.subplots(figsize=(6, 3))
        for label, key in (("plain image", "plain"), ("encrypted", "encrypted")):
            left = 0.0
            for phase, color in (("kernel", "C0"), ("initrd", "C1"), ("userspace", "C2")):
                v = s[key].get(phase)
                if v is not None:
                    ax.barh(
                        [label],
                        [v],
                        left=left,
                        color=color,
                        label=phase if key == "plain" else None,
                    )
                    left += v
        ax.set_xlabel("seconds (systemd-analyze, median)")
        ax.set_title("4. Later boot: plain vs encrypted")
        ax.legend(fontsize=8)
        save(fig, "boot")
    if ini:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = sorted(set(ini["plain"]["by_component"]) | set(ini["product"]["by_component"]))
        for label, key in (("plain", "plain"), ("with encryptrootfs", "product")):
            left = 0.0
            for i, n in enumerate(names):
                v = ini[key]["by_component"].get(n, {}).get("unpacked", 0) / MIB
                ax.barh(
                    [label],
                    [v],
                    left=left,
                    color=f"C{i % 10}",
                    label=n if key == "product" else None,
                )
                left += v
        ax.set_xlabel("MiB unpacked")
        ax.set_title(f"5. Initramfs: +{ini['growth_compressed_mib']:.2f} MiB compressed")
        ax.legend(fontsize=6, ncol=2)
        save(fig, "initramfs")
    if fleet:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        done = fleet["finish_times_s"]
        a1.plot(done, range(1, len(done) + 1), label="unlocked machines")
        a1.axvline(fleet["ideal_s"], color="g", linestyle="--", label="ideal N/rate")
        a1.axvline(1.5 * fleet["ideal_s"], color="r", linestyle=":", label="1.5x ideal")
        a1.set_xlabel("seconds after the start signal")
        a1.set_title(f"6. {fleet['machines']} unlocks at {fleet['rate_per_s']:g} req/s")
        a1.legend(fontsize=7)
        dist = {int(k): v for k, v in fleet["requests_per_machine"].items()}
        a2.bar(list(dist), list(dist.values()))
        a2.set_xlabel("Decrypt requests per machine (1 = no retry)")
        a2.set_ylabel("machines")
        save(fig, "fleet")
    native_report.plot(pieces, plt, save)


def write(results: dict[str, Any]) -> Path:
    try:
        _plots(results)
    except ImportError:
        print("bench: matplotlib is missing (pip install -e '.[bench]'); no figures drawn")
    RESULTS_MD.write_text(markdown(results))
    return RESULTS_MD
