"""The recovery key at the boot prompt: KMS unreachable, a person types the key on the console.

One machine, two boots. The first boot encrypts the plain root (KMS up), and in the real root
the operator adds a recovery key (``encryptrootfs recovery-key add``, the real command; the
test reads the key from the results channel, as the operator reads it off the screen). The
second boot finds KMS unreachable: after the first failed round of unwrap attempts the console
asks for the recovery key through systemd's console password agent while the retries go on.
A wrong key is said to be wrong and asked again; the right one opens the root, the machine
boots and the test tree verifies. The key appears nowhere in the console or the journal.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from encryptrootfs.passphrase import normalise
from encryptrootfs_lab.cloud import GUEST_KMS_URL, EmulatedCloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import Disk, DiskLayout, build_disk
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import ENCRYPT, inspect_script

NewMachine = Callable[..., Machine]
IMAGES = (ENCRYPT,)  # built with the session's others (tests/vm/conftest.py)
ROOT = "/dev/vda1"
PROMPT = f"Recovery key for {ROOT}"
# A well-formed key that is not this disk's.
WRONG_KEY = "00000-00000-00000-00000-00000-00000-00000-00000"
# --iter-time: the keyslot's Argon2id is tuned in the guest (TCG), so opening it there takes
# about this long; short keeps the wrong-then-right sequence quick.
ADD_RECOVERY_KEY = f"""\
echo "ERFS-RECOVERY $(encryptrootfs recovery-key add {ROOT} --iter-time 1000 --json \
| tr -d '\\n ')"
"""

# What `encryptrootfs status` reports about this boot's unlock (the initramfs's record).
STATUS = """\
echo "ERFS-LASTUNLOCK $(encryptrootfs status /dev/vda1 --json | python3 -c \
'import json,sys; print(json.dumps(json.load(sys.stdin)["devices"][0]["last_unlock"]))')"
"""


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(ENCRYPT)


@pytest.fixture(scope="module")
def plain_disk(image: Image) -> Disk:
    return build_disk(DiskLayout(), image)


@pytest.fixture
def kms_cloud(module_cloud: EmulatedCloud) -> Iterator[EmulatedCloud]:
    module_cloud.kms.set_unreachable(False)
    module_cloud.kms.clear_log()
    yield module_cloud
    module_cloud.kms.set_unreachable(False)


def _console(m: Machine, name: str) -> str:
    try:
        return (m.workdir / f"{name}.console.log").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def answer_prompts(m: Machine, name: str, keys: list[str], said: list[str]) -> threading.Thread:
    """Type ``keys`` one by one, each once the console shows the prompt again (after the
    previous key's verdict); ``said`` gets a note per key typed."""
    deadline = time.monotonic() + 900

    def watch() -> None:
        typed = 0
        while typed < len(keys) and time.monotonic() < deadline:
            time.sleep(0.5)
            text = _console(m, name)
            if typed and "does not open" not in text:
                continue
            # the prompt after the last verdict (the first one: any prompt)
            after = text.rsplit("does not open", 1)[-1] if typed else text
            if PROMPT not in after or m.console_socket is None:
                continue
            time.sleep(1.0)  # the agent has switched the console to read the answer
            m.type_line(keys[typed])
            said.append(f"typed key {typed + 1} at {time.monotonic():.0f}")
            typed += 1

    t = threading.Thread(target=watch, name=f"type-{name}", daemon=True)
    t.start()
    return t


def test_recovery_key_typed_on_the_console_opens_the_root_when_kms_is_unreachable(
    image: Image,
    plain_disk: Disk,
    kms_cloud: EmulatedCloud,
    new_machine: NewMachine,
) -> None:
    m = new_machine(image, plain_disk, kms_cloud)
    first = m.boot(inspect_script() + ADD_RECOVERY_KEY, timeout=900, name="first")
    assert first.ok and first.marker("TREE-OK") is not None, first.describe()
    added = first.marker("RECOVERY")
    assert added is not None and added.value.startswith("{"), first.describe()
    key = json.loads(added.value)["recovery_key"]
    assert bytes(normalise(key)) == key.encode()

    kms_cloud.kms.set_unreachable(True)
    kms_cloud.kms.clear_log()
    typed: list[str] = []
    watcher = answer_prompts(m, "recovery", [WRONG_KEY, key.upper().replace("-", "")], typed)
    r = m.boot(inspect_script() + STATUS, timeout=900, name="recovery")
    watcher.join(timeout=5)

    assert len(typed) == 2, f"typed {typed}\n" + r.describe()
    assert r.ok and r.marker("TREE-OK") is not None, r.describe()
    dev = r.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": m.disk.root_uuid}, (
        r.describe()
    )
    console = r.console
    # KMS was tried and failed, the prompt said why and that the retries go on
    assert f"attempt 1 failed: the connection to KMS at {GUEST_KMS_URL} failed" in console, (
        r.describe()
    )
    assert "asking for the recovery key on the console" in console, r.describe()
    assert f"That recovery key does not open {ROOT}; try again." in console, r.describe()
    assert f"{ROOT}: opened with the recovery key" in console, r.describe()
    assert kms_cloud.kms.requests == [], "KMS was down, yet its emulator saw requests"
    # the key typed never shows: not on the console, not in the initrd's journal
    for shown in (key, key.upper().replace("-", ""), key.replace("-", "")):
        assert shown not in console and shown not in r.results, "the recovery key was shown"
    # the boot's unlock record says a person opened it with the recovery key
    last = r.marker("LASTUNLOCK")
    assert last is not None, r.describe()
    record = json.loads(last.value)
    assert record["method"] == "recovery-key" and record["key_id"] is None, record
    assert record["device"] == ROOT and record["keyslot"] != 0, record
