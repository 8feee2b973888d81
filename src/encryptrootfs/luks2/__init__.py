"""cryptsetup, LUKS2: read the header, manage tokens and keyslots, encrypt in place.

A package split by concern (``header``: the pure model and parser; ``cryptsetup``: the version
gate, the one gateway to cryptsetup and its commands; ``pending_token``: the crash-safe token
writer; ``reencrypt``: in-place encryption). Callers keep importing ``encryptrootfs.luks2``
and calling ``luks2.X``: every name is re-exported here.

Every command goes through :func:`~encryptrootfs.run.run` (or ``run_streaming`` for the data
pass), with keys only on stdin or through :func:`~encryptrootfs.run.secret_fd`. cryptsetup's
exit codes (1 bad arguments / not LUKS, 2 no key matched, 3 out of memory, 4 wrong device,
5 busy) and its messages are turned into sentences here, so callers never see a raw exit code
for a failure they could explain.

The header is read from two outputs of ``luksDump``: ``--dump-json-metadata`` for keyslots,
tokens, segments and requirements, and the text dump for what lives in the binary header only
(version, UUID, label, subsystem, epoch). Both are parsed by pure functions, so the unit tier
checks the parsing against outputs recorded from a real cryptsetup.

First-boot in-place encryption, in the order the stages use it:
:func:`reencrypt_encrypt_init` (header + keyslot, UUID chosen by the caller, no data encrypted)
-> :func:`import_token_while_pending` (cryptsetup refuses token changes in that state, so the
token is written into the header's JSON area here, crash-safe) -> :func:`test_keyslot` ->
:func:`reencrypt_resume` (data pass with progress; recovers a killed pass first, and is run
again after any crash). :func:`reencrypt_abort_init` puts the plain device back if the key
cannot be made safe before the data pass starts.
"""

from __future__ import annotations

from .cryptsetup import (
    CRYPTSETUP as CRYPTSETUP,
)
from .cryptsetup import (
    FEATURES as FEATURES,
)
from .cryptsetup import (
    MINIMUM_VERSION as MINIMUM_VERSION,
)
from .cryptsetup import (
    PBKDF as PBKDF,
)
from .cryptsetup import (
    PBKDF_ITERATIONS as PBKDF_ITERATIONS,
)
from .cryptsetup import (
    PROGRESS_JSON_SINCE as PROGRESS_JSON_SINCE,
)
from .cryptsetup import (
    RECOVERY_ITER_TIME_MS as RECOVERY_ITER_TIME_MS,
)
from .cryptsetup import (
    RECOVERY_MEMORY_KIB as RECOVERY_MEMORY_KIB,
)
from .cryptsetup import (
    RECOVERY_PBKDF as RECOVERY_PBKDF,
)
from .cryptsetup import (
    Feature as Feature,
)
from .cryptsetup import (
    PathArg as PathArg,
)
from .cryptsetup import (
    Version as Version,
)
from .cryptsetup import (
    add_keyslot as add_keyslot,
)
from .cryptsetup import (
    add_passphrase_keyslot as add_passphrase_keyslot,
)
from .cryptsetup import (
    close_device as close_device,
)
from .cryptsetup import (
    cryptsetup_version as cryptsetup_version,
)
from .cryptsetup import (
    format_device as format_device,
)
from .cryptsetup import (
    is_luks as is_luks,
)
from .cryptsetup import (
    kill_keyslot as kill_keyslot,
)
from .cryptsetup import (
    luks_version as luks_version,
)
from .cryptsetup import (
    open_device as open_device,
)
from .cryptsetup import (
    parse_version as parse_version,
)
from .cryptsetup import (
    read_dump as read_dump,
)
from .cryptsetup import (
    read_header as read_header,
)
from .cryptsetup import (
    require_cryptsetup as require_cryptsetup,
)
from .cryptsetup import (
    resize_device as resize_device,
)
from .cryptsetup import (
    run_cryptsetup as run_cryptsetup,
)
from .cryptsetup import (
    set_label as set_label,
)
from .cryptsetup import (
    stream_cryptsetup as stream_cryptsetup,
)
from .cryptsetup import (
    test_any_keyslot as test_any_keyslot,
)
from .cryptsetup import (
    test_keyslot as test_keyslot,
)
from .header import (
    Digest as Digest,
)
from .header import (
    DumpFields as DumpFields,
)
from .header import (
    Keyslot as Keyslot,
)
from .header import (
    LuksHeader as LuksHeader,
)
from .header import (
    ReencryptionState as ReencryptionState,
)
from .header import (
    Segment as Segment,
)
from .header import (
    encryption_progress as encryption_progress,
)
from .header import (
    parse_dump_text as parse_dump_text,
)
from .header import (
    parse_header as parse_header,
)
from .header import (
    thaw as thaw,
)
from .reencrypt import (
    ReencryptProgress as ReencryptProgress,
)
from .reencrypt import (
    parse_progress_line as parse_progress_line,
)
from .reencrypt import (
    reencrypt_abort_init as reencrypt_abort_init,
)
from .reencrypt import (
    reencrypt_encrypt_init as reencrypt_encrypt_init,
)
from .reencrypt import (
    reencrypt_recover as reencrypt_recover,
)
from .reencrypt import (
    reencrypt_resume as reencrypt_resume,
)
from .tokens import (
    _read_copy as _read_copy,
)
from .tokens import (
    export_token as export_token,
)
from .tokens import (
    import_token as import_token,
)
from .tokens import (
    import_token_while_pending as import_token_while_pending,
)
from .tokens import (
    remove_token as remove_token,
)
