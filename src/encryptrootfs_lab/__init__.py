"""encryptrootfs_lab: test and demo support (emulators, VM lab); never shipped to a machine.

Kept apart from the product package so that nothing in ``encryptrootfs`` can import it and the
initramfs never carries it.
"""
