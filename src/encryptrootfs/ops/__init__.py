"""Operator verbs: run on a machine whose root is already up (``enroll``, ``token``, ``rewrap``,
``recovery-key``, ``status``, ``volumes``), one module per verb (clevis ``src/luks/``).

Nothing under :mod:`encryptrootfs.boot` imports from here: the initramfs unlock must not pay
for the operator's code, and tests/unit/test_layout.py holds that line.
"""
