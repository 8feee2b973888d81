"""encryptrootfs: encrypt a cloud machine's root filesystem in place on first boot.

The volume key is random, lives in plaintext only in memory, and is stored only wrapped by a
cloud KMS inside a token in the LUKS2 header. Every later boot unwraps it and unlocks the root.
"""

__version__ = "0.1.0"
