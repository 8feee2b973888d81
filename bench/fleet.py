"""Measure 6: a fleet of machines unlocking at once against a throttled KMS.

Every simulated machine has its own wrapped key (made by the product's ``new_key`` with its own
LUKS UUID in the encryption context, as a first boot does), its own ``AwsKmsProvider`` from the
provider registry (``provider_for_token``) and its own botocore KMS client, and unlocks with the
boot's own retry loop (``boot.unlock.with_kms_retries`` around ``provider.unwrap``, the product
defaults: 5 botocore standard-mode attempts per unwrap, rounds with backoff until ``[boot]
unlock_timeout``). The machines run as threads spread over a pool of real processes; they wait
for one start signal, so all unwraps begin together, as after a region-wide power event.

What is not the product's: the machines of one process share one botocore session (the model
files are loaded once per process; each machine still has its own client, credentials come from
the IMDS emulator through that session), and the network gate sees a route table that names
127.0.0.1 (network bring-up is not part of this measure). The KMS emulator's token bucket
(``KmsEmulator.throttle``) answers ``ThrottlingException`` beyond the rate, as AWS does.
Retries per machine are counted from the emulator's request log: each machine's requests carry
its own LUKS UUID in the encryption context.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encryptrootfs.config import parse_config
from encryptrootfs.token import KmsToken, token_from_json, token_to_json

from .common import WORKDIR

try:
    import tomllib
except ImportError:  # pragma: no cover - the venv is 3.11
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class FleetSize:
    machines: int
    rate_per_s: float
    burst: int
    processes: int


FULL = FleetSize(machines=1000, rate_per_s=50.0, burst=50, processes=20)
SMALL = FleetSize(machines=60, rate_per_s=20.0, burst=20, processes=3)
CONTEXT_KEY = "encryptrootfs:luks_uuid"
# The lab guests' route to the metadata address, as /proc/net/route prints it: the network gate
# of the boot passes at once (network bring-up is measured elsewhere, not here).
ROUTE_TABLE = (
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    "bench0\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"
)


def config_toml(kms_url: str, imds_url: str, key_id: str) -> str:
    # Product defaults for the budgets (unlock_timeout 300 s, total_timeout 60 s, 5 attempts).
    return f"""\
[root]
device = "cmdline"
[providers.aws_kms]
key_id = "{key_id}"
endpoint_url = "{kms_url}"
imds_endpoint = "{imds_url}"
[providers.aws_kms.encryption_context]
fleet = "bench"
"""


class _RoundCounter(logging.Handler):
    """Counts the boot's own console lines ("machine N: attempt K failed", "... done on ...")."""

    pattern = re.compile(r"^machine (\d+): (?:done on attempt|attempt) (\d+)")

    def __init__(self) -> None:
        super().__init__()
        self.rounds: dict[int, int] = {}
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.match(record.getMessage())
        if m:
            with self.lock_:
                i, k = int(m.group(1)), int(m.group(2))
                self.rounds[i] = max(self.rounds.get(i, 0), k)


def _worker(
    config_text: str,
    route_table: str,
    share: list[tuple[int, dict[str, Any]]],
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    from encryptrootfs.boot.unlock import with_kms_retries
    from encryptrootfs.errors import EncryptrootfsError
    from encryptrootfs.providers import provider_for_token
    from encryptrootfs.providers.base import wipe

    config = parse_config(tomllib.loads(config_text), source="bench")
    counter = _RoundCounter()
    boot_log = logging.getLogger("encryptrootfs")
    boot_log.addHandler(counter)
    boot_log.setLevel(logging.INFO)
    boot_log.propagate = False  # 1000 machines' console lines are counted, not printed
    session: Any = None
    machines = []
    for index, obj in share:
        token = token_from_json(obj)
        assert token is not None
        provider: Any = provider_for_token(config, token.wrapped)
        if session is None:  # the product's session, with its IMDS settings
            session = provider._botocore_session()
        provider._session = session  # one model cache per process (see the module docstring)
        # What each machine does before its first KMS call: credentials through IMDS, a client.
        provider._client(token.wrapped.region, time.monotonic() + 120)
        machines.append((index, token, provider))
    out: list[dict[str, Any]] = []
    lock = threading.Lock()

    def unlock(index: int, token: KmsToken, provider: Any) -> None:
        start.wait()
        began = time.time()
        error = None
        try:
            key, _ = with_kms_retries(
                config,
                "unwrap the root key",
                [(f"machine {index}", lambda: (provider.unwrap(token.wrapped), token))],
                outcome="",
                route_table=route_table_path,
            )
            wipe(key)
        except EncryptrootfsError as exc:
            error = exc.message[:300]
        with lock:
            out.append({"machine": index, "start": began, "end": time.time(), "error": error})

    with tempfile.NamedTemporaryFile("w", suffix=".route", delete=False) as f:
        f.write(route_table)
        route_table_path = Path(f.name)
    threads = [threading.Thread(target=unlock, args=m, daemon=True) for m in machines]
    for t in threads:
        t.start()
    ready.put(len(machines))
    for t in threads:
        t.join()
    route_table_path.unlink()
    for item in out:
        item["rounds"] = counter.rounds.get(item["machine"], 0)
    results.put(out)


def _wrapped_keys(kms_url: str, imds_url: str, key_id: str, n: int) -> list[dict[str, Any]]:
    """One token per machine, each made by the product's own new_key (GenerateDataKey)."""
    from encryptrootfs.providers import provider_from_config
    from encryptrootfs.token import KmsToken as Token

    config = parse_config(tomllib.loads(config_toml(kms_url, imds_url, key_id)), source="bench")
    provider = provider_from_config(config)
    tokens = []
    for _ in range(n):
        new = provider.new_key(str(uuid.uuid4()))
        new.wipe()
        tokens.append(token_to_json(Token(keyslots=("0",), wrapped=new.wrapped)))
    return tokens


def run(size: FleetSize) -> dict[str, Any]:
    from encryptrootfs_lab.cloud import emulated_cloud
    from encryptrootfs_lab.product import LAB_KEY_ALIAS, create_lab_key

    ctx = mp.get_context("spawn")
    with emulated_cloud() as cloud:
        create_lab_key(cloud.kms)
        text = config_toml(cloud.kms.url, cloud.imds.url, LAB_KEY_ALIAS)
        tokens = _wrapped_keys(cloud.kms.url, cloud.imds.url, LAB_KEY_ALIAS, size.machines)
        uuid_of = {i: t["encryption_context"][CONTEXT_KEY] for i, t in enumerate(tokens)}
        shares: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(size.processes)]
        for i, token in enumerate(tokens):
            shares[i % size.processes].append((i, token))
        ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [
            ctx.Process(target=_worker, args=(text, ROUTE_TABLE, share, ready, start, results))
            for share in shares
        ]
        prep = time.monotonic()
        for p in procs:
            p.start()
        _gather(ready, procs, 900)
        prep_s = time.monotonic() - prep
        cloud.kms.clear_log()
        cloud.kms.throttle(size.rate_per_s, size.burst)
        t0 = time.time()
        start.set()
        done: list[dict[str, Any]] = []
        for share_done in _gather(results, procs, 1800):
            done.extend(share_done)
        for p in procs:
            p.join(timeout=60)
        requests = list(cloud.kms.requests)
    per_uuid: Counter[str] = Counter()
    throttled: Counter[str] = Counter()
    for q in requests:
        u = q.encryption_context.get(CONTEXT_KEY)
        if q.action == "Decrypt" and u:
            per_uuid[u] += 1
            if q.error_code == "ThrottlingException":
                throttled[u] += 1
    for item in done:
        u = uuid_of[item["machine"]]
        item["requests"] = per_uuid[u]
        item["throttled"] = throttled[u]
        item["seconds"] = item["end"] - t0
    finished = sorted(d["seconds"] for d in done if d["error"] is None)
    completion = max(d["seconds"] for d in done)
    ideal = size.machines / size.rate_per_s
    granted = [q.time - t0 for q in requests if q.status == 200 and q.action == "Decrypt"]
    errors = Counter(d["error"] or "" for d in done if d["error"])
    work = WORKDIR / "fleet"
    work.mkdir(parents=True, exist_ok=True)
    (work / "machines.json").write_text(json.dumps(done, indent=1))
    return {
        "machines": size.machines,
        "rate_per_s": size.rate_per_s,
        "burst": size.burst,
        "processes": size.processes,
        "prep_s": prep_s,
        "failures": sum(1 for d in done if d["error"] is not None),
        "failure_reasons": dict(errors.most_common(5)),
        "completion_s": completion,
        "ideal_s": ideal,
        "ratio_to_ideal": completion / ideal,
        "median_s": statistics.median(finished) if finished else None,
        "p95_s": finished[int(0.95 * (len(finished) - 1))] if finished else None,
        "requests_total": sum(per_uuid.values()),
        "throttled_total": sum(throttled.values()),
        "requests_per_machine": dict(
            sorted(Counter(per_uuid[uuid_of[d["machine"]]] for d in done).items())
        ),
        "rounds_per_machine": dict(sorted(Counter(d["rounds"] for d in done).items())),
        "granted_per_s": _per_second(granted),
        "finish_times_s": finished,
    }


def _gather(queue: Any, procs: list[Any], timeout: float) -> list[Any]:
    """One item from each process; a process that died without sending one is an error."""
    import queue as queue_module

    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < len(procs):
        try:
            items.append(queue.get(timeout=2))
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                raise RuntimeError(
                    f"fleet workers failed (exit codes {dead}) or timed out"
                ) from None
    return items


def _per_second(times: list[float]) -> list[int]:
    if not times:
        return []
    buckets = [0] * (int(max(times)) + 1)
    for t in times:
        if t >= 0:
            buckets[int(t)] += 1
    return buckets
